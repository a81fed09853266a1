//! A minimal binary that acts as the sandbox child, as the graphbuild CLI does, so the
//! engine's tests can run sandboxes without the CLI crate.
//!
//! - `sandbox-child __graphbuild-sandbox`: the child.
//! - `sandbox-child --run-spec SPEC.json`: plays the engine: runs the spec in a sandbox
//!   (re-executing itself), prints each output line, then `outcome: …`. Tests kill this
//!   process to check that no sandbox process outlives the engine.

use graphbuild_engine::sandbox::{SANDBOX_ARG, SandboxSpec, child_main, run_sandbox};

fn run_spec(spec_path: &str) -> Result<(), String> {
    let bytes = std::fs::read(spec_path).map_err(|error| format!("{spec_path}: {error}"))?;
    let spec: SandboxSpec =
        serde_json::from_slice(&bytes).map_err(|error| format!("{spec_path}: {error}"))?;
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let outcome = run_sandbox(&exe, &spec, &mut |line| println!("{line}"));
    println!("outcome: {outcome:?}");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(SANDBOX_ARG) => child_main(),
        Some("--run-spec") if args.len() == 3 => {
            if let Err(error) = run_spec(&args[2]) {
                eprintln!("sandbox-child: {error}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("usage: sandbox-child {SANDBOX_ARG} | sandbox-child --run-spec SPEC.json");
            std::process::exit(2);
        }
    }
}
