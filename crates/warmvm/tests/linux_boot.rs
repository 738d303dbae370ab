//! Boots a real Linux kernel (Debian's cloud kernel, extracted by
//! `scripts/fetch-linux-kernel.sh` to `target/linux/vmlinux`, or the file named by
//! `WARMVM_LINUX_KERNEL`) with `warmvm run` and waits for its banner and command line on the
//! serial console, and for the kernel's list of the ACPI tables warmvm gave it. On this project's development KVM, ring 0 is only emulated: the banner takes
//! about 20 s (PVH entry of the vmlinux) and the kernel dies later on an instruction the
//! emulator lacks, so the test stops at the banner.
//!
//! Without a kernel the test is skipped, unless `WARMVM_REQUIRE_KVM=1` (CI), where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use warmvm_testkit::{kvm_available, scratch, skip_or_fail};

const TIMEOUT: Duration = Duration::from_secs(6 * 60);

/// Kills and reaps the VMM however the test ends.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kernel_path() -> PathBuf {
    match std::env::var_os("WARMVM_LINUX_KERNEL") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/linux/vmlinux"),
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[test]
fn linux_prints_its_banner_and_command_line() {
    let test = "linux_prints_its_banner_and_command_line";
    let kernel = kernel_path();
    if !kernel.is_file() {
        skip_or_fail(
            test,
            &format!(
                "no Linux kernel at {} (run scripts/fetch-linux-kernel.sh)",
                kernel.display()
            ),
        );
        return;
    }
    if !kvm_available(test) {
        return;
    }

    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = scratch(&format!("linux-boot-{nonce}"));
    let console = dir.join("console.log");
    let config = dir.join("vm.toml");
    let cmdline =
        format!("console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 nokaslr warmvm_test={nonce}");
    let kernel = kernel.canonicalize().unwrap();
    std::fs::write(
        &config,
        format!(
            "[[vm]]\n\
             name = \"linux\"\n\
             memory_mib = 512\n\
             vcpus = 1\n\
             kernel = {}\n\
             boot = \"auto\"\n\
             cmdline = {}\n\
             console_log = {}\n\
             hide_cx16 = true\n",
            toml_string(&kernel.to_string_lossy()),
            toml_string(&cmdline),
            toml_string(&console.to_string_lossy()),
        ),
    )
    .unwrap();

    let vmm_log = dir.join("vmm.log");
    let log_file = std::fs::File::create(&vmm_log).unwrap();
    let mut vmm = Vmm(Command::new(env!("CARGO_BIN_EXE_warmvm"))
        .arg("run")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap());

    let start = Instant::now();
    let found = loop {
        let text = std::fs::read(&console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        // The kernel lists the ACPI tables it found early, right after the banner: warmvm's
        // RSDP (where the zero page and the BIOS-area scan point) and the FADT.
        if text.contains("Linux version")
            && text.contains(&cmdline)
            && text.contains("ACPI: RSDP 0x00000000000E0000")
            && text.contains("ACPI: FACP")
        {
            break Ok(start.elapsed());
        }
        if let Ok(Some(status)) = vmm.0.try_wait() {
            break Err(format!("warmvm exited with {status} before the banner"));
        }
        if start.elapsed() > TIMEOUT {
            break Err(format!(
                "no banner, command line and ACPI tables within {TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(vmm);

    match found {
        Ok(t) => {
            eprintln!("Linux banner, command line and ACPI tables after {t:?}");
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(why) => {
            let tail = |p: &Path| {
                let s = std::fs::read_to_string(p).unwrap_or_default();
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            };
            panic!(
                "{why}\n--- warmvm output ({}):\n{}\n--- console ({}):\n{}",
                vmm_log.display(),
                tail(&vmm_log),
                console.display(),
                tail(&console)
            );
        }
    }
}
