//! This process's executable: the path it was started from, which build it is, and the
//! sha256 of the file that actually runs.
//!
//! An operator upgrades by installing a new build over the old path and warm-rebooting.
//! The daemon therefore remembers, at start and before anything can replace the file, the
//! path it was started from (`readlink /proc/self/exe`, or a symlink to it that it was
//! started through: see [`started_path`]); a warm reboot without another binary starts
//! that path, i.e. whatever is installed there by then. The running image
//! itself stays reachable through `/proc/self/exe` (see [`running_image`]) for processes
//! that must speak exactly this build's protocol, such as the snapshot writer.
//!
//! Every warmvm process is called [`PROCESS_NAME`] (`comm` and `argv[0]`), however it was
//! started, so that `pidof warmvm`, `pgrep warmvm` and `ps -C warmvm` find it after any
//! number of warm reboots: the processes warmvm starts get `argv[0]` = [`PROCESS_NAME`],
//! and [`remember`] renames the process when the file it was started from has another
//! name (`/proc/self/exe` makes it `exe`, a `--binary` path its own basename).

use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name of every warmvm process: its `argv[0]` and its `comm`.
pub const PROCESS_NAME: &str = "warmvm";

/// The git commit this build was made from, or "unknown" (see `build.rs`).
pub const GIT_COMMIT: &str = env!("WARMVM_GIT_COMMIT");

/// Which executable a warmvm process runs. It crosses processes in a warm reboot's report,
/// always whole (the report's field is optional as a whole for older builds).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BinaryInfo {
    /// The path the process was started from (what a warm reboot without another binary
    /// starts again).
    pub path: String,
    /// The package version.
    pub version: String,
    /// The git commit of the build, or "unknown".
    pub commit: String,
    /// The sha256 (hex) of the file that runs, read at start through `/proc/self/exe`:
    /// that of the image in memory even when the path now holds another file.
    pub sha256: String,
}

struct Started {
    /// The path this process was started from, or why it cannot be told.
    path: Result<PathBuf, String>,
    /// The running image, opened at start (it stays readable when the path is replaced).
    image: Result<File, String>,
    sha256: OnceLock<String>,
}

static STARTED: OnceLock<Started> = OnceLock::new();

/// The environment variable in which a warmvm that starts another names the path it
/// started it from (`argv[0]` is [`PROCESS_NAME`], so it cannot say).
pub const STARTED_AS_ENV: &str = "WARMVM_STARTED_AS";

fn started() -> &'static Started {
    STARTED.get_or_init(|| {
        let image = File::open(running_image());
        let path = match &image {
            Ok(file) => {
                let named = [
                    std::env::var_os(STARTED_AS_ENV).map(PathBuf::from),
                    std::env::args_os().next().map(PathBuf::from),
                ];
                started_path(file, named.iter().flatten())
            }
            Err(_) => started_from_link(),
        };
        Started {
            path,
            image: image.map_err(|e| e.to_string()),
            sha256: OnceLock::new(),
        }
    })
}

/// The path this process was started from: the first absolute one of `named` (the path
/// a warmvm says it started us from, then `argv[0]`) that is the very file running, so a
/// symlink the operator started (`/usr/local/bin/warmvm -> /opt/warmvm-1.2/warmvm`) is
/// kept and a reboot follows it to whatever it points at by then; else the file's own
/// path as the kernel knows it.
fn started_path<'a>(
    image: &File,
    named: impl IntoIterator<Item = &'a PathBuf>,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(running) = image.metadata() {
        let same = |p: &Path| {
            std::fs::metadata(p).is_ok_and(|m| m.dev() == running.dev() && m.ino() == running.ino())
        };
        if let Some(p) = named
            .into_iter()
            .find(|p| p.is_absolute() && !p.starts_with("/proc") && same(p))
        {
            return Ok(p.clone());
        }
    }
    started_from_link()
}

/// `readlink /proc/self/exe`, without the " (deleted)" the kernel appends once the file
/// was removed or replaced: the path is what matters (a new build may be there now).
fn started_from_link() -> Result<PathBuf, String> {
    let link = std::fs::read_link(running_image()).map_err(|e| e.to_string())?;
    let link = match link.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(stripped) => PathBuf::from(stripped),
        None => link,
    };
    if link.is_absolute() {
        Ok(link)
    } else {
        Err(format!("the kernel names it {}", link.display()))
    }
}

/// Note this process's executable; call it first thing in `main`, before the file can be
/// replaced. It names the process [`PROCESS_NAME`] if it was started under that `argv[0]`
/// or through `/proc/self/exe`.
pub fn remember() {
    let _ = started();
    set_process_name();
}

/// Hash the running image on a thread of its own (a daemon does at start), so that the
/// status and a reboot's report need not wait for it: whoever asks earlier waits for this
/// thread in `OnceLock::get_or_init`.
pub fn hash_in_background() {
    if started().image.is_ok() {
        let _ = std::thread::Builder::new()
            .name("exe-sha256".into())
            .spawn(|| {
                let _ = sha256();
            });
    }
}

/// The path this process was started from (see [`started_from_link`]).
pub fn started_from() -> Result<&'static Path, String> {
    started().path.as_deref().map_err(Clone::clone)
}

/// The image this very process runs, whatever the path it was started from holds now.
pub fn running_image() -> PathBuf {
    PathBuf::from("/proc/self/exe")
}

/// The sha256 (hex) of the running image, or "unknown" if it cannot be read.
pub fn sha256() -> String {
    let s = started();
    s.sha256
        .get_or_init(|| match &s.image {
            Ok(file) => hash(file).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot hash the running executable");
                "unknown".to_string()
            }),
            Err(_) => "unknown".to_string(),
        })
        .clone()
}

/// The sha256 (hex) of everything `file` holds from its start.
pub fn hash(mut file: &File) -> std::io::Result<String> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// This process's executable, as [`BinaryInfo`] (waits for the hash if it is not done).
pub fn info() -> BinaryInfo {
    BinaryInfo {
        path: match started_from() {
            Ok(p) => p.display().to_string(),
            Err(e) => format!("unknown ({e})"),
        },
        version: env!("CARGO_PKG_VERSION").to_string(),
        commit: GIT_COMMIT.to_string(),
        sha256: sha256(),
    }
}

/// Why `path` cannot be started as a warmvm by this process, if it cannot: it must be an
/// absolute path to a regular file this process may execute (checked with the effective
/// ids, so a daemon that dropped its privileges is told what it will meet at exec).
pub fn check_runnable(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    if !path.is_absolute() {
        return Err("must be an absolute path".into());
    }
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path holds a NUL byte".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; faccessat only
    // reads it.
    let r = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::X_OK, libc::AT_EACCESS) };
    if r != 0 {
        return Err(format!(
            "not executable by this process: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The calling thread's name (for the main thread, the process's `comm`).
fn comm() -> Option<String> {
    let mut buf = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `buf`.
    let r = unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    CStr::from_bytes_until_nul(&buf)
        .ok()
        .map(|c| c.to_string_lossy().into_owned())
}

/// Whether a process started with `argv0` and named `comm` by the kernel is to be renamed
/// [`PROCESS_NAME`]: when warmvm started it (its `argv[0]`) or when it was started through
/// `/proc/self/exe` (then the kernel calls it `exe`). An operator's own name for a copy
/// started directly is left alone.
fn wants_rename(argv0: Option<&std::ffi::OsStr>, comm: &str) -> bool {
    if comm == PROCESS_NAME {
        return false;
    }
    let base = argv0.and_then(|a| Path::new(a).file_name());
    base == Some(std::ffi::OsStr::new(PROCESS_NAME)) || comm == "exe"
}

fn set_process_name() {
    let Some(comm) = comm() else { return };
    let argv0 = std::env::args_os().next();
    if !wants_rename(argv0.as_deref(), &comm) {
        return;
    }
    let name = c"warmvm";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; `name` is one
    // and outlives the call.
    let r = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot name the process warmvm");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn processes_warmvm_started_are_named_warmvm() {
        assert!(wants_rename(Some(OsStr::new("warmvm")), "exe"));
        assert!(wants_rename(Some(OsStr::new("warmvm")), "warmvm-new"));
        assert!(wants_rename(Some(OsStr::new("/proc/self/exe")), "exe"));
        assert!(!wants_rename(Some(OsStr::new("warmvm")), "warmvm"));
        // An operator's own copy under another name keeps it.
        assert!(!wants_rename(Some(OsStr::new("/opt/warmvm-2/vmm")), "vmm"));
        assert!(!wants_rename(None, "vmm"));
    }

    #[test]
    fn the_hash_is_the_files_sha256() {
        let dir = std::env::temp_dir().join(format!("warmvm-exe-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"abc").unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(
            hash(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_path_started_from_is_absolute_and_the_image_hashes() {
        let p = started_from().expect("the test binary's path");
        assert!(p.is_absolute(), "{}", p.display());
        let h = sha256();
        assert_eq!(h.len(), 64, "{h}");
        let again = hash(&File::open(running_image()).unwrap()).unwrap();
        assert_eq!(h, again);
    }

    #[test]
    fn a_symlink_started_from_is_kept_if_it_is_the_running_file() {
        let dir = std::env::temp_dir().join(format!("warmvm-exe-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (real, link, other) = (dir.join("real"), dir.join("link"), dir.join("other"));
        std::fs::write(&real, b"build").unwrap();
        std::fs::write(&other, b"another build").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let image = File::open(&real).unwrap();
        assert_eq!(started_path(&image, [&link]).unwrap(), link);
        // A name that is another file, a relative one or /proc/self/exe is not taken: the
        // kernel's path for this test binary is.
        let own = started_from_link().unwrap();
        for named in [&other, &PathBuf::from("link"), &running_image()] {
            assert_eq!(
                started_path(&image, [named]).unwrap(),
                own,
                "{}",
                named.display()
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unrunnable_paths_are_refused() {
        assert!(check_runnable(Path::new("/bin/sh")).is_ok());
        assert!(check_runnable(Path::new("bin/sh")).is_err());
        assert!(check_runnable(Path::new("/nonexistent/warmvm")).is_err());
        assert!(check_runnable(Path::new("/")).is_err());
        let dir = std::env::temp_dir().join(format!("warmvm-exe-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("noexec");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        let e = check_runnable(&path).unwrap_err();
        assert!(e.contains("not executable"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
