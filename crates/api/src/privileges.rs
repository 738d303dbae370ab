//! Least privilege: once the daemon holds what only root can open (KVM, its sockets), it
//! can run on as another uid/gid with only the capabilities still configured.
//!
//! The drop happens on the main thread while it is the process's only thread: uids and
//! gids are per process (glibc applies them to every thread), but capabilities, the
//! bounding set and `no_new_privs` are per thread and are inherited only by threads
//! created afterwards. Everything the daemon starts later (API, vCPU, device, console
//! threads, the helper that starts a warm reboot's new daemon) therefore inherits the
//! reduced set, and so does the new daemon itself: across its `execve` only the ambient
//! set survives for a non-root uid, which is exactly the kept capabilities.
//!
//! What the dropped daemon, and the daemon a warm reboot starts from it, still opens by
//! path: the state directory (console logs, saved reboots), disk images and snapshot
//! directories named in requests, and TAPs by name (creating one needs CAP_NET_ADMIN;
//! attaching to a persistent one without an owner, or owned by the user, does not). Not
//! `/dev/kvm`: the daemon keeps the one it opened as root, and a warm reboot hands it to
//! the new daemon with the handover's `Hello`. Only a reboot into an older build, which
//! opens the device by path, needs the user to have access (e.g. the `kvm` group). The
//! drop checks the state directory and refuses to go on without it, so a daemon never runs
//! VMs it could not warm-reboot; it warns when /dev/kvm is out of reach.

use std::ffi::CString;
use std::path::Path;

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Group, Uid, User};
use warmvm_vmm::PrivilegesConfig;

/// Why the privileges cannot be dropped as configured (each a one-line message).
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("--user {0}: no such user (give a user name or a numeric uid)")]
    NoUser(String),
    #[error("--group {0}: no such group (give a group name or a numeric gid)")]
    NoGroup(String),
    #[error("--user {0}: uid 0 drops nothing; name an unprivileged user")]
    Root(String),
    #[error("--group and --keep-caps need --user")]
    NoUserGiven,
    #[error("--keep-caps {0}: not a capability (e.g. CAP_NET_ADMIN or net_admin)")]
    BadCap(String),
    #[error("cannot look up {what}: {source}")]
    Lookup {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "--user needs the daemon to start as root (or with CAP_SETUID, CAP_SETGID and CAP_SETPCAP)"
    )]
    NotPrivileged,
    #[error("privileges must be dropped while the daemon has one thread; it has {0}")]
    Threads(usize),
    #[error("cannot give the state directory {dir} to uid {uid}: {source}")]
    Chown {
        dir: String,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot drop privileges ({step}): {source}")]
    Caps {
        step: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot drop privileges ({step}): {source}")]
    Sys {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error(
        "after dropping to uid {uid} gid {gid}, the uid 0 could be taken back: refusing to run"
    )]
    NotDropped { uid: u32, gid: u32 },
    #[error("after dropping to uid {uid} gid {gid}, the state directory {dir} is not writable ({source}): chown it to the user, let the daemon create it, or name it in the unit's StateDirectory=")]
    StateDir {
        uid: u32,
        gid: u32,
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// Whom to become, resolved and checked before anything changes.
#[derive(Debug, Clone)]
pub struct Target {
    pub uid: Uid,
    pub gid: Gid,
    /// The user's name when it has a passwd entry: its supplementary groups are kept.
    name: Option<CString>,
    pub keep: CapsHashSet,
}

/// Merge the flags over the config's `[privileges]` (field by field) and resolve them.
/// `None` when no user is configured: nothing is dropped.
pub fn resolve(
    flags: Option<&PrivilegesConfig>,
    config: Option<&PrivilegesConfig>,
) -> Result<Option<Target>, PrivilegeError> {
    let pick = |f: fn(&PrivilegesConfig) -> Option<String>| {
        flags.and_then(f).or_else(|| config.and_then(f))
    };
    let user = pick(|p| p.user.clone());
    let group = pick(|p| p.group.clone());
    let keep_caps = match flags.filter(|f| !f.keep_caps.is_empty()) {
        Some(f) => f.keep_caps.clone(),
        None => config.map(|c| c.keep_caps.clone()).unwrap_or_default(),
    };
    let Some(user) = user else {
        if group.is_some() || !keep_caps.is_empty() {
            return Err(PrivilegeError::NoUserGiven);
        }
        return Ok(None);
    };
    let lookup = |what: String| move |source| PrivilegeError::Lookup { what, source };
    let entry = match user.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)).map_err(lookup(format!("uid {n}")))?,
        Err(_) => Some(
            User::from_name(&user)
                .map_err(lookup(format!("user {user}")))?
                .ok_or_else(|| PrivilegeError::NoUser(user.clone()))?,
        ),
    };
    let uid = match (&entry, user.parse::<u32>()) {
        (Some(e), _) => e.uid,
        (None, Ok(n)) => Uid::from_raw(n),
        (None, Err(_)) => return Err(PrivilegeError::NoUser(user)),
    };
    if uid.is_root() {
        return Err(PrivilegeError::Root(user));
    }
    let gid = match &group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => Gid::from_raw(n),
            Err(_) => {
                Group::from_name(g)
                    .map_err(lookup(format!("group {g}")))?
                    .ok_or_else(|| PrivilegeError::NoGroup(g.clone()))?
                    .gid
            }
        },
        // A bare uid without a passwd entry: the group of the same number.
        None => entry
            .as_ref()
            .map_or(Gid::from_raw(uid.as_raw()), |e| e.gid),
    };
    let keep = keep_caps
        .iter()
        .map(|c| {
            caps::to_canonical(c)
                .parse::<Capability>()
                .map_err(|_| PrivilegeError::BadCap(c.clone()))
        })
        .collect::<Result<CapsHashSet, _>>()?;
    Ok(Some(Target {
        uid,
        gid,
        name: entry.and_then(|e| CString::new(e.name).ok()),
        keep,
    }))
}

/// Threads of this process, from `/proc/self/status`.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// True if the state directory is the daemon's to give to the user it drops to: it created
/// the directory itself, or systemd did for this service (`StateDirectory=`,
/// `RuntimeDirectory=`, ...: systemd names them, colon-separated and absolute, in
/// `$STATE_DIRECTORY`, `$RUNTIME_DIRECTORY`, `$CACHE_DIRECTORY`, `$LOGS_DIRECTORY`). Such a
/// directory is root's when the unit has no `User=` (the daemon drops by itself), and
/// systemd gives its whole tree back to root at each start. Any other directory is the
/// operator's: it must already be writable by the user.
pub fn is_ours_to_give(
    dir: &Path,
    created: bool,
    systemd_dirs: &[Option<std::ffi::OsString>],
) -> bool {
    if created {
        return true;
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = canon(dir);
    systemd_dirs.iter().flatten().any(|list| {
        std::env::split_paths(list)
            .filter(|p| p.is_absolute())
            .any(|p| canon(&p) == dir)
    })
}

/// The directories systemd made for this service, as its environment names them.
pub fn systemd_dirs_from_env() -> Vec<Option<std::ffi::OsString>> {
    [
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "CACHE_DIRECTORY",
        "LOGS_DIRECTORY",
    ]
    .iter()
    .map(std::env::var_os)
    .collect()
}

/// Give `dir` and everything under it that root owns to `uid`:`gid` (symlinks themselves,
/// never what they point to; other users' files stay theirs). Returns how many entries
/// changed owner.
pub fn give_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let mut changed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.uid() == 0 {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
            changed += 1;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(changed)
}

impl Target {
    /// Become the target. `give_state_dir`: the state directory is the daemon's to give
    /// (see [`is_ours_to_give`]): it and what root owns in it become the user's; any other
    /// must already be writable by the user. `lock`: the state directory's lock file,
    /// always the user's (the daemon made it). `kvm`: the KVM device, which the user is
    /// warned about if it cannot open it.
    pub fn apply(
        &self,
        state_dir: &Path,
        give_state_dir: bool,
        lock: Option<&Path>,
        kvm: &Path,
    ) -> Result<(), PrivilegeError> {
        let n = threads();
        if n != 1 {
            return Err(PrivilegeError::Threads(n));
        }
        let needed = [
            Capability::CAP_SETUID,
            Capability::CAP_SETGID,
            Capability::CAP_SETPCAP,
        ];
        for cap in needed {
            if !caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false) {
                return Err(PrivilegeError::NotPrivileged);
            }
        }
        let (uid, gid) = (self.uid.as_raw(), self.gid.as_raw());
        let chown_err = |dir: &Path| {
            let dir = dir.display().to_string();
            move |source| PrivilegeError::Chown { dir, uid, source }
        };
        if give_state_dir {
            let n = give_tree(state_dir, uid, gid).map_err(chown_err(state_dir))?;
            tracing::debug!(dir = %state_dir.display(), entries = n, uid, gid, "gave the state directory to the user");
        }
        if let Some(lock) = lock {
            std::os::unix::fs::lchown(lock, Some(uid), Some(gid)).map_err(chown_err(lock))?;
        }
        let caps_err = |step| move |source| PrivilegeError::Caps { step, source };
        let sys_err = |step| move |source| PrivilegeError::Sys { step, source };
        // The bounding set first: dropping from it needs CAP_SETPCAP in effect, which the
        // uid change below takes away.
        for cap in caps::read(None, CapSet::Bounding).map_err(caps_err("read bounding set"))? {
            if !self.keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("bounding set"))?;
            }
        }
        // Keep the permitted set across the uid change, to pick the kept ones from it.
        caps::securebits::set_keepcaps(true).map_err(caps_err("keep caps"))?;
        match &self.name {
            Some(name) => nix::unistd::initgroups(name, self.gid),
            None => nix::unistd::setgroups(&[self.gid]),
        }
        .map_err(sys_err("supplementary groups"))?;
        nix::unistd::setresgid(self.gid, self.gid, self.gid).map_err(sys_err("setresgid"))?;
        nix::unistd::setresuid(self.uid, self.uid, self.uid).map_err(sys_err("setresuid"))?;
        caps::set(None, CapSet::Permitted, &self.keep).map_err(caps_err("permitted set"))?;
        caps::set(None, CapSet::Inheritable, &self.keep).map_err(caps_err("inheritable set"))?;
        caps::set(None, CapSet::Effective, &self.keep).map_err(caps_err("effective set"))?;
        // Ambient: what a warm reboot's new daemon (a non-root uid exec'ing a plain
        // binary) keeps across execve; the rest of its sets start empty.
        caps::set(None, CapSet::Ambient, &self.keep).map_err(caps_err("ambient set"))?;
        caps::securebits::set_keepcaps(false).map_err(caps_err("keep caps"))?;
        nix::sys::prctl::set_no_new_privs().map_err(sys_err("no_new_privs"))?;

        // Proof, before any VM depends on it: root cannot be taken back ...
        if nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok() {
            return Err(PrivilegeError::NotDropped { uid, gid });
        }
        // ... and console logs and saved reboots can be written.
        let probe = state_dir.join(format!(".warmvm-write-check-{}", std::process::id()));
        std::fs::File::create_new(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|source| PrivilegeError::StateDir {
                uid,
                gid,
                dir: state_dir.display().to_string(),
                source,
            })?;
        // KVM need not open: a warm reboot hands this daemon's KVM fd over, and only a
        // reboot into an older build opens the device by path. Say so once, here.
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
            tracing::warn!(
                uid,
                gid,
                path = %kvm.display(),
                error = %e,
                "the KVM device cannot be opened as this user: warm reboots hand it over, but \
                 one into a build older than this one (which opens it by path) will be \
                 refused, the VMs staying here; give the user access (e.g. --group kvm) to \
                 allow that"
            );
        }
        tracing::info!(
            uid,
            gid,
            keep_caps = ?self.keep,
            "dropped privileges"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(user: Option<&str>, group: Option<&str>, caps: &[&str]) -> PrivilegesConfig {
        PrivilegesConfig {
            user: user.map(str::to_string),
            group: group.map(str::to_string),
            keep_caps: caps.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn err(flags: PrivilegesConfig) -> String {
        resolve(Some(&flags), None).unwrap_err().to_string()
    }

    #[test]
    fn nothing_configured_drops_nothing() {
        assert!(resolve(None, None).unwrap().is_none());
        assert!(resolve(Some(&cfg(None, None, &[])), None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_settings_are_refused_with_one_line_naming_the_flag() {
        assert_eq!(
            err(cfg(Some("no-such-user-xq"), None, &[])),
            "--user no-such-user-xq: no such user (give a user name or a numeric uid)"
        );
        assert_eq!(
            err(cfg(Some("65534"), Some("no-such-group-xq"), &[])),
            "--group no-such-group-xq: no such group (give a group name or a numeric gid)"
        );
        assert_eq!(
            err(cfg(Some("0"), None, &[])),
            "--user 0: uid 0 drops nothing; name an unprivileged user"
        );
        assert_eq!(
            err(cfg(None, Some("65534"), &[])),
            "--group and --keep-caps need --user"
        );
        assert_eq!(
            err(cfg(Some("65534"), None, &["CAP_FLY"])),
            "--keep-caps CAP_FLY: not a capability (e.g. CAP_NET_ADMIN or net_admin)"
        );
        for e in [
            err(cfg(Some("no-such-user-xq"), None, &[])),
            err(cfg(Some("65534"), None, &["x"])),
        ] {
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn numbers_names_and_capability_spellings_resolve() {
        let t = resolve(
            Some(&cfg(Some("65534"), Some("4242"), &["net_admin"])),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!((t.uid.as_raw(), t.gid.as_raw()), (65534, 4242));
        assert_eq!(
            t.keep,
            CapsHashSet::from([Capability::CAP_NET_ADMIN]),
            "net_admin is CAP_NET_ADMIN"
        );
        // A uid without a passwd entry takes the gid of the same number.
        let t = resolve(Some(&cfg(Some("4243"), None, &[])), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.gid.as_raw(), 4243);
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("warmvm-priv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_created_or_systemd_made_directories_are_given() {
        let dir = temp_dir("ours");
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        // Created by the daemon: given, whatever the environment says.
        assert!(is_ours_to_give(&dir, true, &[]));
        // An operator's directory: not given.
        assert!(!is_ours_to_give(&dir, false, &[None, None]));
        assert!(!is_ours_to_give(&dir, false, &[os("/var/lib/other")]));
        // systemd's StateDirectory= (several are colon-separated), also by another
        // spelling of the same path; relative entries are ignored.
        let listed = format!("/var/lib/other:{}", dir.display());
        assert!(is_ours_to_give(&dir, false, &[None, os(&listed)]));
        let spelled = format!("{}/./", dir.display());
        assert!(is_ours_to_give(&dir, false, &[os(&spelled)]));
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        assert!(!is_ours_to_give(&dir, false, &[os(&name)]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tree_is_given_without_following_links_or_taking_others_files() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let dir = temp_dir("tree");
        let outside = temp_dir("outside");
        std::fs::create_dir_all(dir.join("vm1")).unwrap();
        std::fs::write(dir.join("vm1/console.log"), "x").unwrap();
        std::fs::write(dir.join("others"), "x").unwrap();
        std::os::unix::fs::chown(dir.join("others"), Some(4321), Some(4321)).unwrap();
        std::fs::write(outside.join("target"), "x").unwrap();
        std::os::unix::fs::symlink(outside.join("target"), dir.join("link")).unwrap();
        let n = give_tree(&dir, 65534, 65534).unwrap();
        assert_eq!(n, 4, "the directory, vm1, its log and the link itself");
        for p in ["", "vm1", "vm1/console.log"] {
            let m = std::fs::metadata(dir.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{p}");
        }
        let link = std::fs::symlink_metadata(dir.join("link")).unwrap();
        assert_eq!(link.uid(), 65534);
        assert_eq!(std::fs::metadata(outside.join("target")).unwrap().uid(), 0);
        assert_eq!(std::fs::metadata(dir.join("others")).unwrap().uid(), 4321);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&outside);
    }

    #[test]
    fn flags_win_over_the_config_field_by_field() {
        let config = cfg(Some("65534"), Some("4242"), &["CAP_NET_ADMIN"]);
        let flags = cfg(None, Some("4244"), &[]);
        let t = resolve(Some(&flags), Some(&config)).unwrap().unwrap();
        assert_eq!((t.uid.as_raw(), t.gid.as_raw()), (65534, 4244));
        assert_eq!(t.keep, CapsHashSet::from([Capability::CAP_NET_ADMIN]));
    }
}
