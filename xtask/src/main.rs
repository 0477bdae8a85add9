//! Project automation. `cargo xtask ci` runs every check CI runs; `cargo xtask bench` runs the
//! benchmarks. See the README.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod boundaries;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("check-boundaries") => boundaries::check(&root()),
        Some("robustness") => robustness(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 ci               boundaries, fmt check, clippy -D warnings, tests, doc tests, bench build, loadgen, robustness\n  \
                 bench [args]     criterion benches (args go to `cargo bench`), then loadgen vs etcd\n  \
                 bench --quick    loadgen only, every scenario tiny, docs untouched\n  \
                 bench --loadgen  loadgen only, default sizes (rewrites its docs/benchmarks.md section)\n  \
                 bench --mirror [--quick] [args]  keywatch mirror vs etcd grpc-proxy (rewrites its docs/cluster.md section)\n  \
                 check-boundaries fail if a boundary rule of ARCHITECTURE.md is broken\n  \
                 robustness [--duration S] [--seed N]...  randomized kill/stall/compaction runs, validated"
            );
            bail!("unknown or missing command")
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The `etcd-client` crate (a dev-dependency of the compatibility suite) generates its code
/// with `protoc` at build time. Our own crates never need it (watch-proto uses protox), so
/// rather than requiring a system package, xtask points `PROTOC` at a vendored binary when
/// none is installed.
fn protoc_env(cmd: &mut Command) {
    if std::env::var_os("PROTOC").is_some() || on_path("protoc") {
        return;
    }
    match protoc_bin_vendored::protoc_bin_path() {
        Ok(path) => {
            cmd.env("PROTOC", path);
        }
        Err(e) => eprintln!(
            "xtask: no protoc on PATH and no vendored one ({e}); etcd-client will not build"
        ),
    }
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join(bin).is_file()))
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut cmd = Command::new(&cargo);
    protoc_env(&mut cmd);
    let status = cmd
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    let started = std::time::Instant::now();
    boundaries::check(&root())?;
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ])?;
    // Not `--all-targets`: that would also run every criterion bench once in test mode, in a
    // debug build, which measures nothing and costs minutes.
    cargo(&[
        "test",
        "--workspace",
        "--lib",
        "--bins",
        "--tests",
        "--examples",
        "--locked",
    ])?;
    cargo(&["test", "--workspace", "--doc", "--locked"])?;
    // The benches must keep compiling; the dev profile reuses the test build's artifacts.
    cargo(&["build", "--workspace", "--benches", "--locked"])?;
    // The end-to-end load generator, every scenario tiny, debug build, docs untouched.
    cargo(&[
        "build",
        "-p",
        "watch-server",
        "-p",
        "keywatch-loadgen",
        "--locked",
    ])?;
    loadgen("debug", &["--quick", "--no-write", "--no-progress"])?;
    // Mirror mode against etcd's grpc-proxy, tiny (15-25 s): the bench and its checks.
    mirror_bench("debug", &["--quick", "--no-write"])?;
    // Seeds 1 and 2 plus one random seed (printed), about 45 s; outcome-only assertions.
    robustness(&[])?;
    eprintln!("xtask: ci passed in {:.0?}", started.elapsed());
    Ok(())
}

fn bench(extra: &[String]) -> Result<()> {
    let quick = extra.iter().any(|a| a == "--quick");
    if extra.iter().any(|a| a == "--mirror") {
        // The mirror bench alone; every other argument is its own (e.g. `--tls`).
        cargo(&[
            "build",
            "--release",
            "-p",
            "watch-server",
            "-p",
            "keywatch-loadgen",
        ])?;
        let mut args: Vec<&str> = extra
            .iter()
            .map(String::as_str)
            .filter(|a| *a != "--mirror")
            .collect();
        if quick {
            args.push("--no-write");
        }
        return mirror_bench("release", &args);
    }
    let loadgen_only = quick || extra.iter().any(|a| a == "--loadgen");
    let extra: Vec<&str> = extra
        .iter()
        .map(String::as_str)
        .filter(|a| !matches!(*a, "--quick" | "--loadgen"))
        .collect();
    if !loadgen_only {
        let mut args = vec!["bench", "-p", "keywatch-benches"];
        if !extra.is_empty() {
            args.push("--");
            args.extend(extra);
        }
        cargo(&args)?;
    }
    cargo(&[
        "build",
        "--release",
        "-p",
        "watch-server",
        "-p",
        "keywatch-loadgen",
    ])?;
    if quick {
        loadgen("release", &["--quick", "--no-write"])
    } else {
        loadgen("release", &[])
    }
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` when set, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Runs the load generator of `profile` against that profile's `watch-server`, from the
/// workspace root (it writes `docs/benchmarks.md` and `docs/bench/` unless `--no-write`).
/// With `--no-write` its charts and JSON go under `target/loadgen/` so they are still drawn.
fn loadgen(profile: &str, args: &[&str]) -> Result<()> {
    let target = target_dir();
    let dir = target.join(profile);
    let mut cmd = Command::new(dir.join("keywatch-loadgen"));
    cmd.arg("--server-bin")
        .arg(dir.join("watch-server"))
        .args(args)
        .current_dir(root());
    if args.contains(&"--no-write") {
        cmd.arg("--out-dir").arg(target.join("loadgen"));
    }
    eprintln!("xtask: keywatch-loadgen {}", args.join(" "));
    let status = cmd.status().context("running keywatch-loadgen")?;
    if !status.success() {
        bail!("keywatch-loadgen failed with {status}");
    }
    Ok(())
}

/// Runs `keywatch-mirror-bench` of `profile` against that profile's `watch-server`, from the
/// workspace root (it rewrites its section of `docs/cluster.md` unless `--no-write`).
fn mirror_bench(profile: &str, args: &[&str]) -> Result<()> {
    let dir = target_dir().join(profile);
    let mut cmd = Command::new(dir.join("keywatch-mirror-bench"));
    cmd.arg("--server-bin")
        .arg(dir.join("watch-server"))
        .args(args)
        .current_dir(root());
    eprintln!("xtask: keywatch-mirror-bench {}", args.join(" "));
    let status = cmd.status().context("running keywatch-mirror-bench")?;
    if !status.success() {
        bail!("keywatch-mirror-bench failed with {status}");
    }
    Ok(())
}

/// Builds the watch-server binary and runs the robustness runner against it. `--duration S`
/// (seconds per seed) and `--seed N` (repeatable) go to `keywatch-robustness random`; any other
/// first word is a runner subcommand (e.g. `stalled --stalled 1000 --writes 100000`).
fn robustness(extra: &[String]) -> Result<()> {
    cargo(&["build", "-p", "watch-server"])?;
    let server = target_dir().join("debug/watch-server");
    let server = server.to_string_lossy();
    let mut args = vec![
        "run",
        "-p",
        "keywatch-robustness",
        "--",
        "--server-bin",
        &server,
    ];
    if extra.first().is_none_or(|a| a.starts_with("--")) {
        args.push("random");
    }
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}
