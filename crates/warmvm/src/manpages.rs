//! `warmvm man DIR`: man pages generated from the CLI's clap definition (clap_mangen), one
//! per command: warmvm.1, warmvm-vm.1, warmvm-vm-create.1, ...

use std::path::Path;
use std::process::ExitCode;

use crate::failure::{Failure, EXIT_BAD_INPUT};

pub fn write(dir: &Path) -> Result<ExitCode, Failure> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure::new(
            EXIT_BAD_INPUT,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let mut cmd = <crate::args::Cli as clap::CommandFactory>::command();
    // Propagates the global options into every subcommand's page.
    cmd.build();
    let mut written = 0;
    page(dir, &cmd, "warmvm", &mut written)?;
    eprintln!("warmvm: wrote {written} man pages to {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn page(dir: &Path, cmd: &clap::Command, name: &str, written: &mut usize) -> Result<(), Failure> {
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.to_string()))
        .render(&mut out)
        .and_then(|()| std::fs::write(&path, &out))
        .map_err(|e| {
            Failure::new(
                EXIT_BAD_INPUT,
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
    *written += 1;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        page(dir, sub, &format!("{name}-{}", sub.get_name()), written)?;
    }
    Ok(())
}
