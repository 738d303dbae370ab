//! scripts/fetch-linux-kernel.sh (run by scripts/test, the README's test command) on a machine
//! without Debian's cloud kernel: it must install the kernel package and then unpack it, not
//! stop silently. The script runs against a fake /boot (WARMVM_BOOT_DIR), with fake `apt-get`
//! and `id` first on PATH; the fake `apt-get` "installs" a small bzImage built here, whose
//! gzip payload is an ELF header.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-linux-kernel.sh")
}

fn temp_dir(tag: &str) -> PathBuf {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let d = std::env::temp_dir().join(format!(
        "warmvm-fetch-kernel-{tag}-{}-{nonce}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_exe(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bzImage as the script reads it: setup header ("HdrS", protocol 2.15), one setup sector,
/// and a gzip payload (gzip from the host) that decompresses to `elf`.
fn fake_bzimage(dir: &Path, elf: &[u8]) -> Vec<u8> {
    let raw = dir.join("payload");
    std::fs::write(&raw, elf).unwrap();
    let gz = Command::new("gzip").arg("-c").arg(&raw).output().unwrap();
    assert!(gz.status.success(), "gzip failed");
    let payload = gz.stdout;
    let mut image = vec![0u8; 1024];
    image[0x1f1] = 1; // setup sectors: the payload area starts at (1 + 1) * 512
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    image.extend_from_slice(&payload);
    image
}

struct Fake {
    dir: PathBuf,
    boot: PathBuf,
    out: PathBuf,
    bin: PathBuf,
    apt_log: PathBuf,
}

/// A fake machine: an empty /boot, and an `apt-get` that puts `image` there when asked to
/// install linux-image-cloud-amd64 (or nothing, with `image` None).
fn fake_machine(tag: &str, image: Option<&[u8]>) -> Fake {
    let dir = temp_dir(tag);
    let boot = dir.join("boot");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let apt_log = dir.join("apt.log");
    let kernel = dir.join("package-kernel");
    if let Some(image) = image {
        std::fs::write(&kernel, image).unwrap();
    }
    write_exe(
        &bin.join("apt-get"),
        &format!(
            "#!/bin/sh\necho \"$*\" >> '{log}'\ncase \"$*\" in *linux-image-cloud-amd64*)\n  \
             [ -f '{kernel}' ] && cp '{kernel}' '{boot}/vmlinuz-9.9.9-cloud-amd64';;\nesac\nexit 0\n",
            log = apt_log.display(),
            kernel = kernel.display(),
            boot = boot.display()
        ),
    );
    write_exe(&bin.join("id"), "#!/bin/sh\necho 0\n");
    Fake {
        out: dir.join("out"),
        dir,
        boot,
        bin,
        apt_log,
    }
}

fn run(f: &Fake) -> Output {
    let path = format!(
        "{}:{}",
        f.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .arg(script())
        .env("PATH", path)
        .env("WARMVM_BOOT_DIR", &f.boot)
        .env("WARMVM_LINUX_OUT", &f.out)
        .env_remove("LINUX_KERNEL")
        .output()
        .unwrap()
}

#[test]
fn without_a_cloud_kernel_it_installs_one_and_unpacks_it() {
    let dir = temp_dir("image");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(4096, 0xab);
    let image = fake_bzimage(&dir, &elf);
    let f = fake_machine("install", Some(&image));

    let first = run(&f);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{:?}: {stderr}", first.status);
    let apt = std::fs::read_to_string(&f.apt_log).unwrap();
    assert!(
        apt.contains("install") && apt.contains("linux-image-cloud-amd64"),
        "apt-get was not asked for the kernel: {apt}"
    );
    assert_eq!(std::fs::read(f.out.join("vmlinux")).unwrap(), elf);
    assert_eq!(std::fs::read(f.out.join("vmlinuz")).unwrap(), image);

    // Now the kernel is there: nothing to install, nothing to redo.
    std::fs::remove_file(&f.apt_log).unwrap();
    let second = run(&f);
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("up to date"));
    assert!(!f.apt_log.exists(), "apt-get ran again");
    let _ = std::fs::remove_dir_all(&f.dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_install_is_reported_not_silent() {
    let f = fake_machine("noinstall", None);
    let r = run(&f);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        stderr.contains("installing linux-image-cloud-amd64") && stderr.contains("installed no"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&f.dir);
}
