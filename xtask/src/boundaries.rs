//! `cargo xtask check-boundaries`: every boundary rule ARCHITECTURE.md states, checked.
//!
//! Each rule's text is in [`RULES`], once; ARCHITECTURE.md quotes it word for word (the check
//! fails if it does not, whitespace and line breaks aside), so the document and the check
//! cannot drift apart. Dependency rules walk `cargo metadata` and `cargo tree`; source rules
//! read the workspace's Rust files outside `tests/` directories with comments blanked, and
//! (except the `include!` check of the codegen rule) string and char contents and
//! `#[cfg(test)]` modules too. xtask's own files are not read: its rule texts name
//! everything the rules forbid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What one rule checks.
enum Check {
    /// `package` has none of the `forbidden` groups' crates in its normal and build dependency tree, all
    /// features, all targets; and each of `needs` as a direct dependency.
    Deps {
        package: &'static str,
        forbidden: &'static [&'static [&'static str]],
        needs: &'static [&'static str],
    },
    /// Only watch-proto generates protobuf code.
    Codegen,
    /// Generated type names appear only under the allowed paths.
    GeneratedNames,
    /// Only the watch-server binary installs a tracing subscriber.
    Subscriber,
    /// No circle between sibling modules of any crate.
    ModuleCircles,
    /// No `spawn(` in watch-core's sources.
    NoSpawn,
    /// No `anyhow` in library targets.
    NoAnyhowInLibs,
    /// etcd-client only as a dev-dependency.
    EtcdClientDevOnly,
    /// No `tests/*.rs` beside `tests/it/`.
    OneTestBinary,
    /// Redb files are created only in [`REDB_CREATE_FILE`].
    RedbCreate,
}

/// A boundary rule: its text (quoted verbatim in ARCHITECTURE.md) and its check.
struct Rule {
    text: &'static str,
    check: Check,
}

/// The rules, in the order ARCHITECTURE.md lists them.
const RULES: &[Rule] = &[
    Rule {
        text: "watch-core depends on no wire, storage, server or metrics crate (prost, tonic, \
               redb, event-log, watch-proto, kv-store, watch-server, prometheus-client), not \
               even transitively.",
        check: Check::Deps {
            package: "watch-core",
            forbidden: &[WIRE, SERVER, METRICS, &["redb", "event-log"]],
            needs: &[],
        },
    },
    Rule {
        text: "event-log stores watch-core's types and depends on no wire, server or metrics \
               crate (prost, tonic, watch-proto, kv-store, watch-server, prometheus-client), \
               not even transitively.",
        check: Check::Deps {
            package: "event-log",
            forbidden: &[WIRE, SERVER, METRICS],
            needs: &["watch-core"],
        },
    },
    Rule {
        text: "kv-store has no gRPC, protobuf, HTTP, CLI, password-hashing or metrics crate in \
               its dependency tree (tonic, prost, axum, hyper, clap, bcrypt, prometheus-client).",
        check: Check::Deps {
            package: "kv-store",
            forbidden: &[WIRE, METRICS, &["axum", "hyper", "clap", "bcrypt"]],
            needs: &[],
        },
    },
    Rule {
        text: "watch-proto depends on no storage or server crate (redb, event-log, kv-store, \
               watch-server), not even transitively: the wire layer knows watch-core's types \
               only.",
        check: Check::Deps {
            package: "watch-proto",
            forbidden: &[SERVER, &["redb", "event-log"]],
            needs: &["watch-core"],
        },
    },
    Rule {
        text: "Only watch-proto generates protobuf code: no other crate depends on a protobuf \
               compiler (prost-build, tonic-build, tonic-prost-build, protox) or includes or \
               derives generated code (`tonic::include_proto!`, `include!` from `OUT_DIR`, a \
               `prost::` derive).",
        check: Check::Codegen,
    },
    Rule {
        text: "Generated wire types (`etcdserverpb`, `mvccpb`, `authpb`, `v3lockpb`, \
               `v3electionpb`) are named only in \
               watch-proto, in watch-server's `server/` (the gRPC services) and `mirror/` \
               (mirror mode's etcd client) modules, and in the wire clients (loadgen, \
               robustness, benches).",
        check: Check::GeneratedNames,
    },
    Rule {
        text: "Only the `watch-server` binary (`crates/watch-server/src/main.rs`) installs a \
               tracing subscriber.",
        check: Check::Subscriber,
    },
    Rule {
        text: "No import circles between modules: in every crate, the modules under one \
               parent do not import each other in a circle (a module counts with everything \
               under it).",
        check: Check::ModuleCircles,
    },
    Rule {
        text: "watch-core starts no task or thread of its own: no `spawn(` in \
               `crates/watch-core/src` (the embedder runs the `Dispatcher`).",
        check: Check::NoSpawn,
    },
    Rule {
        text: "No library target uses `anyhow`: it is for binaries (`main.rs`, `src/bin/`) and \
               xtask; libraries return typed errors.",
        check: Check::NoAnyhowInLibs,
    },
    Rule {
        text: "No product code depends on `etcd-client`: it is a dev-dependency only (tests \
               talk to keywatch and etcd through it).",
        check: Check::EtcdClientDevOnly,
    },
    Rule {
        text: "One integration-test binary per crate: tests live in `tests/it/` (`main.rs` and \
               its modules), never as a top-level `tests/*.rs`.",
        check: Check::OneTestBinary,
    },
    Rule {
        text: "A redb file is created only by `event_log::files::open_or_create_redb` \
               (built under a temporary name, renamed into place once whole): no other \
               product code that names `redb::` calls `Database::create` or a builder's \
               `.create(`.",
        check: Check::RedbCreate,
    },
];

/// Metrics crates: only watch-server exports metrics.
const METRICS: &[&str] = &["prometheus-client"];

/// The wire layer: protobuf and gRPC crates, and watch-proto.
const WIRE: &[&str] = &[
    "prost",
    "prost-types",
    "prost-build",
    "tonic",
    "tonic-build",
    "watch-proto",
];

/// The server layers.
const SERVER: &[&str] = &["kv-store", "watch-server"];

/// Where generated type names may appear (paths relative to the workspace root).
const GENERATED_NAMES_ALLOWED: &[&str] = &[
    "crates/watch-proto/",
    "crates/watch-server/src/server/",
    "crates/watch-server/src/mirror/",
    "crates/loadgen/",
    "crates/robustness/",
    "benches/",
];

/// The generated protobuf packages.
const GENERATED_PACKAGES: &[&str] = &[
    "etcdserverpb",
    "mvccpb",
    "authpb",
    "v3lockpb",
    "v3electionpb",
];

/// Protobuf compilers: only watch-proto may depend on one.
const PROTO_COMPILERS: &[&str] = &["prost-build", "tonic-build", "tonic-prost-build", "protox"];

/// The one file allowed to install a tracing subscriber.
const SUBSCRIBER_FILE: &str = "crates/watch-server/src/main.rs";

/// Runs every rule; prints one line per rule and fails listing every violation.
pub(crate) fn check(root: &Path) -> Result<()> {
    let ws = Workspace::load(root)?;
    let doc =
        std::fs::read_to_string(root.join("ARCHITECTURE.md")).context("reading ARCHITECTURE.md")?;
    let doc = squash(&doc);
    let mut failed = 0;
    for (i, rule) in RULES.iter().enumerate() {
        let mut problems = Vec::new();
        if !doc.contains(&squash(rule.text)) {
            problems.push("ARCHITECTURE.md does not state this rule in these words".to_owned());
        }
        match &rule.check {
            Check::Deps {
                package,
                forbidden,
                needs,
            } => match ws.packages.iter().find(|p| p.name == *package) {
                Some(p) => {
                    problems.extend(deps(root, p, forbidden)?);
                    for need in *needs {
                        if !p.deps.iter().any(|d| d == need) {
                            problems.push(format!("{package} does not depend on {need}"));
                        }
                    }
                }
                None => problems.push(format!("no package {package} in the workspace")),
            },
            Check::Codegen => problems.extend(codegen(&ws)),
            Check::GeneratedNames => problems.extend(generated_names(&ws)),
            Check::Subscriber => problems.extend(subscriber(&ws)),
            Check::ModuleCircles => problems.extend(circles(&ws)?),
            Check::NoSpawn => problems.extend(no_spawn(&ws)),
            Check::NoAnyhowInLibs => problems.extend(no_anyhow_in_libs(&ws)),
            Check::EtcdClientDevOnly => problems.extend(etcd_client_dev_only(&ws)),
            Check::OneTestBinary => problems.extend(one_test_binary(&ws)?),
            Check::RedbCreate => problems.extend(redb_create(&ws)),
        }
        if problems.is_empty() {
            eprintln!("xtask: boundary rule {} ok: {}", i + 1, rule.text);
        } else {
            failed += 1;
            eprintln!("xtask: boundary rule {} BROKEN: {}", i + 1, rule.text);
            for p in &problems {
                eprintln!("  - {p}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} boundary rule(s) broken (see above)");
    }
    Ok(())
}

/// Collapses every run of whitespace to one space, so wrapped Markdown matches.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A workspace package as far as the checks need it.
struct Package {
    name: String,
    /// The package directory.
    dir: PathBuf,
    /// Names of its direct dependencies (every kind).
    deps: Vec<String>,
    /// Direct normal and build dependencies only.
    build_deps: Vec<String>,
    /// Source files of its lib and bin targets (crate roots), for the module scan.
    roots: Vec<PathBuf>,
    /// Source files of its bin targets.
    bins: Vec<PathBuf>,
}

struct Workspace {
    root: PathBuf,
    packages: Vec<Package>,
    /// Every scanned source file: (path relative to the root, its code).
    files: Vec<(String, Code)>,
}

impl Workspace {
    fn load(root: &Path) -> Result<Workspace> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(&cargo)
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(root)
            .output()
            .context("running cargo metadata")?;
        if !out.status.success() {
            bail!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
        let mut packages = Vec::new();
        for p in meta["packages"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default().to_owned();
            let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap_or_default());
            let dir = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
            let mut deps = Vec::new();
            let mut build_deps = Vec::new();
            for d in p["dependencies"].as_array().into_iter().flatten() {
                let dep = d["name"].as_str().unwrap_or_default().to_owned();
                if d["kind"].as_str() != Some("dev") {
                    build_deps.push(dep.clone());
                }
                deps.push(dep);
            }
            let mut roots = Vec::new();
            let mut bins = Vec::new();
            for t in p["targets"].as_array().into_iter().flatten() {
                let kinds: Vec<&str> = t["kind"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|k| k.as_str())
                    .collect();
                if kinds
                    .iter()
                    .any(|k| matches!(*k, "lib" | "rlib" | "proc-macro" | "bin"))
                {
                    roots.push(PathBuf::from(t["src_path"].as_str().unwrap_or_default()));
                }
                if kinds.contains(&"bin") {
                    bins.push(PathBuf::from(t["src_path"].as_str().unwrap_or_default()));
                }
            }
            packages.push(Package {
                name,
                dir,
                deps,
                build_deps,
                roots,
                bins,
            });
        }
        let mut files = Vec::new();
        for p in &packages {
            if p.name == "xtask" {
                // Its rule texts name everything the rules forbid.
                continue;
            }
            let mut paths = Vec::new();
            rust_files(&p.dir, &mut paths)?;
            for path in paths {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                files.push((relative(root, &path), Code::new(&text)));
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Workspace {
            root: root.to_path_buf(),
            packages,
            files,
        })
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Every `.rs` file under `dir`, outside `tests/`, `target/` and hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_dir() {
            if name != "tests" && name != "target" && !name.starts_with('.') {
                rust_files(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `cargo tree` of `p` (normal and build edges, all features, all targets): the forbidden
/// crates found, each with what pulls it in.
fn deps(root: &Path, p: &Package, forbidden: &[&[&str]]) -> Result<Vec<String>> {
    let tree = cargo_tree(
        root,
        &["-p", &p.name, "--prefix", "none", "--format", "{p}"],
    )?;
    let present: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut problems = Vec::new();
    for bad in forbidden
        .iter()
        .flat_map(|group| group.iter())
        .filter(|b| present.contains(**b))
    {
        // The inverted tree: who pulls `bad` in, up to `p`.
        let why = cargo_tree(
            root,
            &[
                "-p", &p.name, "--invert", bad, "--prefix", "depth", "--format", "{p}",
            ],
        )?;
        // Its first branch (depth 0, 1, 2, ... in a row) is one path from `bad` up to `p`.
        let mut chain: Vec<&str> = Vec::new();
        for line in why.lines() {
            let name_at = line
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(line.len());
            if line[..name_at].parse::<usize>().ok() != Some(chain.len()) {
                break;
            }
            chain.extend(line[name_at..].split_whitespace().next());
        }
        problems.push(format!(
            "{} depends on {bad}: {}",
            p.name,
            chain.join(" <- ")
        ));
    }
    Ok(problems)
}

fn cargo_tree(root: &Path, args: &[&str]) -> Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "tree",
            "--edges",
            "normal,build",
            "--all-features",
            "--target",
            "all",
        ])
        .args(args)
        .current_dir(root)
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn codegen(ws: &Workspace) -> Vec<String> {
    let mut problems = Vec::new();
    for p in &ws.packages {
        if p.name == "watch-proto" {
            continue;
        }
        for d in &p.build_deps {
            if PROTO_COMPILERS.contains(&d.as_str()) {
                problems.push(format!("{} depends on the protobuf compiler {d}", p.name));
            }
        }
    }
    for (path, code) in &ws.files {
        if path.starts_with("crates/watch-proto/") {
            continue;
        }
        for (line, text) in code.with_strings.lines().enumerate() {
            let out_dir = text.contains("include!") && text.contains("OUT_DIR");
            if text.contains("include_proto!") || out_dir {
                problems.push(format!("{path}:{}: {}", line + 1, text.trim()));
            }
        }
        for (line, derive) in prost_derives(&code.skeleton) {
            problems.push(format!("{path}:{line}: {derive}"));
        }
    }
    problems
}

/// The `derive(...)` attributes of `code` (comments and strings blanked) that name a prost
/// derive, however they are wrapped: `prost::Message` and the like, or `Message`, `Oneof`,
/// `Enumeration` in a file that imports from prost. Each with its 1-based line.
fn prost_derives(code: &str) -> Vec<(usize, String)> {
    let imports_prost = code.contains("use prost::") || code.contains("use prost ::");
    let mut out = Vec::new();
    let mut rest = code;
    let mut offset = 0;
    while let Some(at) = rest.find("derive") {
        let start = offset + at;
        let after = code[start + "derive".len()..].trim_start();
        if let Some(list) = after.strip_prefix('(') {
            let end = list.find(')').unwrap_or(list.len());
            let names: String = list[..end].split_whitespace().collect();
            let prost = names.contains("prost::")
                || (imports_prost
                    && names
                        .split(',')
                        .any(|n| matches!(n, "Message" | "Oneof" | "Enumeration")));
            if prost {
                let line = code[..start].matches('\n').count() + 1;
                out.push((line, format!("derive({names})")));
            }
        }
        offset = start + "derive".len();
        rest = &code[offset..];
    }
    out
}

/// `spawn(` in watch-core's sources (tests and comments aside).
fn no_spawn(ws: &Workspace) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, code) in &ws.files {
        if !path.starts_with("crates/watch-core/src/") {
            continue;
        }
        for (line, text) in code.skeleton.lines().enumerate() {
            let squashed: String = text.split_whitespace().collect();
            if squashed.contains("spawn(") {
                problems.push(format!("{path}:{}: {}", line + 1, text.trim()));
            }
        }
    }
    problems
}

/// The one file allowed to create redb files.
const REDB_CREATE_FILE: &str = "crates/event-log/src/files.rs";

/// `Database::create` or `.create(` (files and directories aside) in product code that names
/// `redb::`, outside [`REDB_CREATE_FILE`].
fn redb_create(ws: &Workspace) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, code) in &ws.files {
        if path == REDB_CREATE_FILE || !code.skeleton.contains("redb::") {
            continue;
        }
        for (line, text) in code.skeleton.lines().enumerate() {
            let squashed: String = text.split_whitespace().collect();
            let create = squashed.contains("Database::create")
                || (squashed.contains(".create(")
                    && !squashed.contains("File::create")
                    && !squashed.contains("create_dir"));
            if create {
                problems.push(format!("{path}:{}: {}", line + 1, text.trim()));
            }
        }
    }
    problems
}

/// `anyhow` named in a library target's sources: every file under a package's `src/` that is
/// not a bin root or under `src/bin/`, for packages with a library target.
fn no_anyhow_in_libs(ws: &Workspace) -> Vec<String> {
    let mut problems = Vec::new();
    for p in &ws.packages {
        let src = p.dir.join("src");
        let bin_dir = src.join("bin");
        let has_lib = p.roots.iter().any(|r| !p.bins.contains(r));
        if !has_lib {
            continue;
        }
        for (path, code) in &ws.files {
            let abs = ws.root.join(path);
            if !abs.starts_with(&src) || abs.starts_with(&bin_dir) || p.bins.contains(&abs) {
                continue;
            }
            for (line, text) in code.skeleton.lines().enumerate() {
                if words(text).any(|w| w == "anyhow") {
                    problems.push(format!("{path}:{}: {}", line + 1, text.trim()));
                }
            }
        }
    }
    problems
}

/// Packages with `etcd-client` as a normal or build dependency.
fn etcd_client_dev_only(ws: &Workspace) -> Vec<String> {
    ws.packages
        .iter()
        .filter(|p| p.build_deps.iter().any(|d| d == "etcd-client"))
        .map(|p| {
            format!(
                "{} depends on etcd-client outside [dev-dependencies]",
                p.name
            )
        })
        .collect()
}

/// `.rs` files directly in a package's `tests/` (each is a test binary of its own).
fn one_test_binary(ws: &Workspace) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for p in &ws.packages {
        let tests = p.dir.join("tests");
        let Ok(entries) = std::fs::read_dir(&tests) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
                problems.push(format!(
                    "{}: a test binary of its own; make it a module of tests/it/",
                    relative(&ws.root, &path)
                ));
            }
        }
    }
    problems.sort();
    Ok(problems)
}

fn generated_names(ws: &Workspace) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, code) in &ws.files {
        if GENERATED_NAMES_ALLOWED.iter().any(|a| path.starts_with(a)) {
            continue;
        }
        for (line, text) in code.skeleton.lines().enumerate() {
            if GENERATED_PACKAGES
                .iter()
                .any(|g| words(text).any(|w| w == *g))
            {
                problems.push(format!("{path}:{}: {}", line + 1, text.trim()));
            }
        }
    }
    problems
}

fn subscriber(ws: &Workspace) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, code) in &ws.files {
        if path == SUBSCRIBER_FILE {
            continue;
        }
        let names_crate = code.skeleton.contains("tracing_subscriber");
        for (line, text) in code.skeleton.lines().enumerate() {
            let squashed: String = text.split_whitespace().collect();
            let init =
                names_crate && (squashed.contains(".init()") || squashed.contains(".try_init()"));
            if init
                || squashed.contains("set_global_default")
                || squashed.contains("subscriber::set_default")
            {
                problems.push(format!("{path}:{}: {}", line + 1, text.trim()));
            }
        }
    }
    problems
}

/// The identifiers of a line.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

/// A source file with comments blanked (`with_strings`) and with comments, string and char
/// contents and `#[cfg(test)]` modules blanked (`skeleton`); both keep every line break, so
/// line numbers match the file.
struct Code {
    with_strings: String,
    skeleton: String,
}

impl Code {
    fn new(text: &str) -> Code {
        #[derive(PartialEq)]
        enum S {
            Code,
            Line,
            Block(u32),
            Str,
            Raw(usize),
        }
        let chars: Vec<char> = text.chars().collect();
        let mut with_strings = String::with_capacity(text.len());
        let mut skeleton = String::with_capacity(text.len());
        let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
        let mut s = S::Code;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            match s {
                S::Code => {
                    if c == '/' && next == Some('/') {
                        s = S::Line;
                        with_strings.push(' ');
                        skeleton.push(' ');
                    } else if c == '/' && next == Some('*') {
                        s = S::Block(1);
                        with_strings.push_str("  ");
                        skeleton.push_str("  ");
                        i += 1;
                    } else if c == '"' {
                        s = S::Str;
                        with_strings.push(c);
                        skeleton.push(c);
                    } else if c == 'r'
                        && matches!(next, Some('"') | Some('#'))
                        && !chars
                            .get(i.wrapping_sub(1))
                            .is_some_and(|p| p.is_alphanumeric() || *p == '_')
                    {
                        let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
                        if chars.get(i + 1 + hashes) == Some(&'"') {
                            s = S::Raw(hashes);
                            with_strings.extend(&chars[i..=i + 1 + hashes]);
                            skeleton.extend(&chars[i..=i + 1 + hashes]);
                            i += 1 + hashes;
                        } else {
                            with_strings.push(c);
                            skeleton.push(c);
                        }
                    } else if c == '\'' {
                        // A char literal ('x', '\n', '"'), else a lifetime.
                        let end = if next == Some('\\') {
                            chars
                                .get(i + 3..)
                                .and_then(|rest| rest.iter().position(|c| *c == '\''))
                                .map(|p| i + 3 + p)
                        } else if chars.get(i + 2) == Some(&'\'') {
                            Some(i + 2)
                        } else {
                            None
                        };
                        match end {
                            Some(end) => {
                                with_strings.extend(&chars[i..=end]);
                                skeleton.push('\'');
                                skeleton.extend(std::iter::repeat_n(' ', end - i - 1));
                                skeleton.push('\'');
                                i = end;
                            }
                            None => {
                                with_strings.push(c);
                                skeleton.push(c);
                            }
                        }
                    } else {
                        with_strings.push(c);
                        skeleton.push(c);
                    }
                }
                S::Line => {
                    if c == '\n' {
                        s = S::Code;
                    }
                    with_strings.push(blank(c));
                    skeleton.push(blank(c));
                }
                S::Block(depth) => {
                    if c == '*' && next == Some('/') {
                        s = if depth == 1 {
                            S::Code
                        } else {
                            S::Block(depth - 1)
                        };
                        with_strings.push_str("  ");
                        skeleton.push_str("  ");
                        i += 1;
                    } else if c == '/' && next == Some('*') {
                        s = S::Block(depth + 1);
                        with_strings.push_str("  ");
                        skeleton.push_str("  ");
                        i += 1;
                    } else {
                        with_strings.push(blank(c));
                        skeleton.push(blank(c));
                    }
                }
                S::Str => {
                    if c == '\\' {
                        with_strings.push(c);
                        skeleton.push(' ');
                        if let Some(n) = next {
                            with_strings.push(n);
                            skeleton.push(blank(n));
                            i += 1;
                        }
                    } else if c == '"' {
                        s = S::Code;
                        with_strings.push(c);
                        skeleton.push(c);
                    } else {
                        with_strings.push(c);
                        skeleton.push(blank(c));
                    }
                }
                S::Raw(hashes) => {
                    let closes = c == '"'
                        && chars[i + 1..]
                            .iter()
                            .take(hashes)
                            .filter(|c| **c == '#')
                            .count()
                            == hashes;
                    if closes {
                        s = S::Code;
                        with_strings.extend(&chars[i..=i + hashes]);
                        skeleton.extend(&chars[i..=i + hashes]);
                        i += hashes;
                    } else {
                        with_strings.push(c);
                        skeleton.push(blank(c));
                    }
                }
            }
            i += 1;
        }
        let skeleton = blank_test_modules(&skeleton);
        Code {
            with_strings,
            skeleton,
        }
    }
}

/// Blanks every `#[cfg(test)] mod name { ... }` (and `#[cfg(test)] mod name;`) of a
/// skeleton (comments and strings already blanked, so braces balance).
fn blank_test_modules(skeleton: &str) -> String {
    let mut out: Vec<char> = skeleton.chars().collect();
    let pattern: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + pattern.len() <= out.len() {
        if out[i..i + pattern.len()] != pattern[..] {
            i += 1;
            continue;
        }
        // What the attribute applies to: skip whitespace and further attributes.
        let mut j = i + pattern.len();
        loop {
            while j < out.len() && out[j].is_whitespace() {
                j += 1;
            }
            if j < out.len() && out[j] == '#' {
                while j < out.len() && out[j] != ']' {
                    j += 1;
                }
                j += 1;
            } else {
                break;
            }
        }
        let rest: String = out[j..out.len().min(j + 200)].iter().collect();
        let item = rest
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub ");
        if !item.starts_with("mod ") {
            i += pattern.len();
            continue;
        }
        // The end of the module: its `;` or its matching `}`.
        let mut k = j;
        let mut depth = 0usize;
        while k < out.len() {
            match out[k] {
                ';' if depth == 0 => break,
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        let end = k.min(out.len() - 1);
        for c in &mut out[i..=end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = k + 1;
    }
    out.into_iter().collect()
}

/// One module of a crate: its path from the crate root and its file.
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// The module tree of the crate rooted at `root_file`, from its `mod name;` declarations
/// (test-only ones left out).
fn module_tree(root_file: &Path) -> Result<Vec<Module>> {
    let mut modules = Vec::new();
    let mut queue = vec![(Vec::new(), root_file.to_path_buf(), true)];
    while let Some((path, file, owns_dir)) = queue.pop() {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let code = Code::new(&text);
        let dir = if owns_dir {
            file.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            file.with_extension("")
        };
        for name in mod_declarations(&code.skeleton) {
            let mut child = path.clone();
            child.push(name.clone());
            let flat = dir.join(format!("{name}.rs"));
            let nested = dir.join(&name).join("mod.rs");
            if flat.is_file() {
                queue.push((child, flat, false));
            } else if nested.is_file() {
                queue.push((child, nested, true));
            }
        }
        modules.push(Module { path, file });
    }
    Ok(modules)
}

/// The names of `mod name;` declarations (file modules) in a skeleton.
fn mod_declarations(skeleton: &str) -> Vec<String> {
    let tokens = tokens(skeleton);
    let mut names = Vec::new();
    for w in tokens.windows(3) {
        if w[0].text == "mod" && w[2].text == ";" && is_ident(&w[1].text) {
            names.push(w[1].text.clone());
        }
    }
    names
}

#[derive(Debug, Clone)]
struct Token {
    text: String,
    line: usize,
}

fn is_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Identifiers, `::` and single punctuation characters, with their line numbers.
fn tokens(skeleton: &str) -> Vec<Token> {
    let chars: Vec<char> = skeleton.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token {
                text: chars[start..i].iter().collect(),
                line,
            });
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                text: c.to_string(),
                line,
            });
            i += 1;
        }
    }
    out
}

/// Parses a use tree or path starting at `tokens[i]` (an identifier): every full path it
/// names (`a::{b, c::d}` gives `a::b` and `a::c::d`; `self` in a group names the prefix).
fn paths_at(tokens: &[Token], i: usize) -> Vec<Vec<String>> {
    fn tree(
        tokens: &[Token],
        mut i: usize,
        prefix: Vec<String>,
        out: &mut Vec<Vec<String>>,
    ) -> usize {
        let mut path = prefix;
        loop {
            match tokens.get(i).map(|t| t.text.as_str()) {
                Some("{") => {
                    i += 1;
                    loop {
                        match tokens.get(i).map(|t| t.text.as_str()) {
                            Some("}") => return i + 1,
                            Some(",") => i += 1,
                            None => return i,
                            _ => i = tree(tokens, i, path.clone(), out),
                        }
                    }
                }
                Some("self") if !path.is_empty() => {
                    out.push(path);
                    return i + 1;
                }
                Some(t) if is_ident(t) => {
                    path.push(t.to_owned());
                    i += 1;
                    if tokens.get(i).map(|t| t.text.as_str()) == Some("::") {
                        i += 1;
                        continue;
                    }
                    out.push(path);
                    // `path as alias`: the alias names nothing new to follow.
                    if tokens.get(i).map(|t| t.text.as_str()) == Some("as") {
                        i += 2;
                    }
                    return i;
                }
                // `*`, or anything unexpected: the path so far.
                Some("*") => {
                    out.push(path);
                    return i + 1;
                }
                _ => {
                    out.push(path);
                    return i;
                }
            }
        }
    }
    let mut out = Vec::new();
    tree(tokens, i, Vec::new(), &mut out);
    out
}

/// An import of one module by another, with where it was seen.
struct Edge {
    from: Vec<String>,
    to: Vec<String>,
    at: String,
}

/// Every circle between sibling modules of every crate of the workspace.
fn circles(ws: &Workspace) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for p in &ws.packages {
        for root in &p.roots {
            let modules = module_tree(root)?;
            let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
            // Items each module re-exports (`pub use`), by name, as absolute paths.
            let mut reexports: BTreeMap<Vec<String>, BTreeMap<String, Vec<String>>> =
                BTreeMap::new();
            let mut references = Vec::new();
            for m in &modules {
                let text = std::fs::read_to_string(&m.file)?;
                let code = Code::new(&text);
                let toks = tokens(&code.skeleton);
                // Inline `mod name { .. }` modules open inside the file: (brace depth, name).
                let mut inline: Vec<(usize, String)> = Vec::new();
                let mut depth = 0usize;
                for (i, t) in toks.iter().enumerate() {
                    let prev = i.checked_sub(1).map(|p| toks[p].text.as_str());
                    match t.text.as_str() {
                        "{" => {
                            depth += 1;
                            if i >= 2 && toks[i - 2].text == "mod" {
                                inline.push((depth, toks[i - 1].text.clone()));
                            }
                        }
                        "}" => {
                            if inline.last().is_some_and(|(d, _)| *d == depth) {
                                inline.pop();
                            }
                            depth = depth.saturating_sub(1);
                        }
                        _ => {}
                    }
                    let here: Vec<String> = m
                        .path
                        .iter()
                        .cloned()
                        .chain(inline.iter().map(|(_, n)| n.clone()))
                        .collect();
                    // `$crate` in macros, and `a::crate` cannot start a path here.
                    if prev == Some("$") || prev == Some("::") {
                        continue;
                    }
                    let is_use = prev == Some("use");
                    if !(t.text == "crate" || t.text == "super" || t.text == "self" || is_use) {
                        continue;
                    }
                    if !is_ident(&t.text) {
                        continue;
                    }
                    let public_use =
                        is_use && i >= 2 && (toks[i - 2].text == "pub" || toks[i - 2].text == ")");
                    for path in paths_at(&toks, i) {
                        let Some(abs) = absolute(&here, &path, &known) else {
                            continue;
                        };
                        if public_use && let Some(name) = path.last() {
                            reexports
                                .entry(m.path.clone())
                                .or_default()
                                .insert(name.clone(), abs.clone());
                        }
                        references.push((
                            here.clone(),
                            abs,
                            format!("{}:{}", relative(&ws.root, &m.file), t.line),
                        ));
                    }
                }
            }
            let mut edges = Vec::new();
            for (from, abs, at) in references {
                let to = resolve(&abs, &known, &reexports);
                edges.push(Edge { from, to, at });
            }
            problems.extend(sibling_circles(&edges));
        }
    }
    Ok(problems)
}

/// The absolute form of `path` seen in module `here`: `crate::`, `super::` and `self::`
/// resolved, a path starting with a child module of `here` made absolute; `None` for
/// anything else (external crates, std, local items).
fn absolute(
    here: &[String],
    path: &[String],
    known: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let mut base: Vec<String>;
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => {
            base = Vec::new();
            rest = &path[1..];
        }
        Some("super") | Some("self") => {
            base = here.to_vec();
            while let Some(first) = rest.first() {
                match first.as_str() {
                    "super" => {
                        base.pop()?;
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        Some(first) => {
            let mut child = here.to_vec();
            child.push(first.to_owned());
            if !known.contains(&child) {
                return None;
            }
            base = here.to_vec();
        }
        None => return None,
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The module `abs` lands in: its longest module prefix, followed through that module's
/// re-exports (a few levels).
fn resolve(
    abs: &[String],
    known: &BTreeSet<Vec<String>>,
    reexports: &BTreeMap<Vec<String>, BTreeMap<String, Vec<String>>>,
) -> Vec<String> {
    let mut abs = abs.to_vec();
    for _ in 0..4 {
        let module_len = (0..=abs.len())
            .rev()
            .find(|n| known.contains(&abs[..*n].to_vec()))
            .unwrap_or(0);
        let module = abs[..module_len].to_vec();
        let Some(next) = abs.get(module_len) else {
            return module;
        };
        match reexports.get(&module).and_then(|r| r.get(next)) {
            Some(target) if target.as_slice() != &abs[..module_len + 1] => {
                let mut followed = target.clone();
                followed.extend(abs[module_len + 1..].iter().cloned());
                abs = followed;
            }
            _ => return module,
        }
    }
    abs
}

/// Rolls every edge up to the two sibling modules it connects (children of their deepest
/// common ancestor; an edge to an ancestor or a descendant connects none) and reports every
/// strongly connected group of siblings, with the imports that tie it.
fn sibling_circles(edges: &[Edge]) -> Vec<String> {
    // parent -> (from child -> to child -> first place seen)
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeMap<String, String>>> =
        BTreeMap::new();
    for e in edges {
        let common = e.from.iter().zip(&e.to).take_while(|(a, b)| a == b).count();
        if common == e.from.len() || common == e.to.len() {
            continue;
        }
        graphs
            .entry(e.from[..common].to_vec())
            .or_default()
            .entry(e.from[common].clone())
            .or_default()
            .entry(e.to[common].clone())
            .or_insert_with(|| e.at.clone());
    }
    let mut problems = Vec::new();
    for (parent, graph) in &graphs {
        let nodes: BTreeSet<&String> = graph
            .keys()
            .chain(graph.values().flat_map(|t| t.keys()))
            .collect();
        // Two nodes are in one circle iff each reaches the other.
        let reach = |from: &String| -> BTreeSet<String> {
            let mut seen = BTreeSet::new();
            let mut stack = vec![from.clone()];
            while let Some(n) = stack.pop() {
                for next in graph.get(&n).into_iter().flat_map(|t| t.keys()) {
                    if seen.insert(next.clone()) {
                        stack.push(next.clone());
                    }
                }
            }
            seen
        };
        let reaches: BTreeMap<&String, BTreeSet<String>> =
            nodes.iter().map(|n| (*n, reach(n))).collect();
        let mut done = BTreeSet::new();
        for n in &nodes {
            if done.contains(*n) || !reaches[n].contains(*n) {
                continue;
            }
            let group: BTreeSet<&String> = nodes
                .iter()
                .filter(|m| reaches[n].contains(**m) && reaches[**m].contains(*n))
                .copied()
                .collect();
            done.extend(group.iter().map(|s| (*s).clone()));
            let name = |m: &String| {
                let mut p = parent.clone();
                p.push(m.clone());
                format!("crate::{}", p.join("::"))
            };
            let mut ties = Vec::new();
            for a in &group {
                for (b, at) in graph.get(*a).into_iter().flatten() {
                    if group.contains(b) {
                        ties.push(format!("{} -> {} ({at})", name(a), name(b)));
                    }
                }
            }
            problems.push(format!(
                "circle between {}: {}",
                group.iter().map(|m| name(m)).collect::<Vec<_>>().join(", "),
                ties.join("; ")
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_blanks_comments_strings_and_test_modules() {
        let code = Code::new(
            "use crate::a; // crate::b\nlet s = \"crate::c\"; let c = '\"';\n#[cfg(test)]\nmod tests {\n    use crate::d;\n}\nuse crate::e;\n",
        );
        assert!(code.skeleton.contains("crate::a"));
        assert!(!code.skeleton.contains("crate::b"));
        assert!(!code.skeleton.contains("crate::c"));
        assert!(!code.skeleton.contains("crate::d"));
        assert!(code.skeleton.contains("crate::e"));
        assert!(code.with_strings.contains("crate::c"));
        assert_eq!(code.skeleton.lines().count(), 7);
    }

    #[test]
    fn use_trees_expand() {
        let toks = tokens("crate::{a::{b, c}, d::self, e as f};");
        let paths: Vec<String> = paths_at(&toks, 0).iter().map(|p| p.join("::")).collect();
        assert_eq!(
            paths,
            ["crate::a::b", "crate::a::c", "crate::d", "crate::e"]
        );
    }

    #[test]
    fn a_circle_between_siblings_is_found_and_an_ancestor_edge_is_not() {
        let edge = |from: &[&str], to: &[&str]| Edge {
            from: from.iter().map(|s| s.to_string()).collect(),
            to: to.iter().map(|s| s.to_string()).collect(),
            at: "f.rs:1".into(),
        };
        let edges = [
            edge(&["server", "kv"], &["mirror"]),
            edge(&["mirror", "sync"], &["server", "convert"]),
            edge(&["mirror", "sync"], &["mirror"]),
        ];
        let found = sibling_circles(&edges);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("circle between crate::mirror, crate::server"));
        assert!(sibling_circles(&edges[1..]).is_empty());
    }

    #[test]
    fn every_rule_is_quoted_in_the_architecture_document() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md"),
        )
        .unwrap();
        let doc = squash(&doc);
        for rule in RULES {
            assert!(
                doc.contains(&squash(rule.text)),
                "not quoted: {}",
                rule.text
            );
        }
    }
}
