//! # vmotion-clidoc: man pages and shell completions for packaging
//!
//! Every vmotion program answers `PROGRAM --generate man|bash|zsh|fish` with its man
//! page (roff, from [`clap_mangen`]) or its completion script (from [`clap_complete`])
//! on stdout, generated from the same clap definition that parses its arguments, so the
//! page can never drift from the flags. The flag is looked for before the program's own
//! arguments are parsed (they may require flags a packager does not give) and is not
//! shown in `--help`. `scripts/dist.sh` uses it.
//!
//! ```no_run
//! # #[derive(clap::Parser)] struct Args { #[arg(long)] vm: String }
//! fn main() -> std::process::ExitCode {
//!     if let Some(code) = vmotion_clidoc::generate_if_asked::<Args>("vmotion-send") {
//!         return code;
//!     }
//!     // ... Args::parse() and the program
//! #   std::process::ExitCode::SUCCESS
//! }
//! ```

#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::io::Write;
use std::process::ExitCode;

use clap_complete::Shell;

/// What `--generate` takes.
pub const KINDS: &[&str] = &["man", "bash", "zsh", "fish"];

/// If the program was run as `NAME --generate KIND`, writes that man page or completion
/// script to stdout and returns the exit code; `None` otherwise (run the program).
pub fn generate_if_asked<C: clap::CommandFactory>(name: &'static str) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new("--generate")) {
        return None;
    }
    let kind = args.next();
    let kind = kind.as_deref().and_then(OsStr::to_str).unwrap_or("");
    let mut out = Vec::new();
    if let Err(e) = generate(C::command(), name, kind, &mut out) {
        eprintln!("{name} --generate: {e}");
        return Some(ExitCode::from(2));
    }
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return Some(ExitCode::from(1));
    }
    Some(ExitCode::SUCCESS)
}

/// Writes `kind` (one of [`KINDS`]) for `command`, named `name`, into `out`.
pub fn generate(
    command: clap::Command,
    name: &'static str,
    kind: &str,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let mut command = command.name(name).bin_name(name);
    match kind {
        "man" => clap_mangen::Man::new(command)
            .render(out)
            .map_err(|e| e.to_string()),
        "bash" | "zsh" | "fish" => {
            let shell: Shell = kind.parse().map_err(|e: String| e)?;
            clap_complete::generate(shell, &mut command, name, out);
            Ok(())
        }
        _ => Err(format!("`{kind}`: generate one of {}", KINDS.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("x").about("Moves one VM.").arg(
            clap::Arg::new("vm")
                .long("vm")
                .required(true)
                .help("The VM."),
        )
    }

    #[test]
    fn a_man_page_and_completions_name_the_program_and_its_flags() {
        let mut man = Vec::new();
        generate(command(), "vmotion-x", "man", &mut man).unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(
            man.starts_with(".ie") || man.contains(".TH vmotion-x"),
            "{man}"
        );
        assert!(man.contains("\\-\\-vm"), "{man}");
        for shell in ["bash", "zsh", "fish"] {
            let mut script = Vec::new();
            generate(command(), "vmotion-x", shell, &mut script).unwrap();
            let script = String::from_utf8(script).unwrap();
            assert!(
                script.contains("vmotion-x") && script.contains("vm"),
                "{shell}: {script}"
            );
        }
        assert!(generate(command(), "vmotion-x", "tcsh", &mut Vec::new()).is_err());
    }
}
