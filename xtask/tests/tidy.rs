//! Tidy checks run as ordinary tests: the layering rules (which crate may link
//! which stack) and the no-stub rule.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The crates `package` depends on outside its dev-dependencies (`cargo tree -e
/// normal`), one name per line.
fn normal_dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains(package),
        "unexpected cargo tree output: {tree}"
    );
    tree.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn assert_no(package: &str, banned: &[&str]) {
    let deps = normal_dependencies(package);
    for b in banned {
        assert!(
            !deps.iter().any(|d| d == b),
            "{package} depends on {b}:\n{}",
            deps.join("\n")
        );
    }
}

#[test]
fn ha_core_normal_dependencies_have_no_network_or_tls_stack() {
    assert_no(
        "ha-core",
        &[
            "quinn",
            "rustls",
            "rcgen",
            "axum",
            "hyper",
            "tokio-rustls",
            "ha-tls",
        ],
    );
}

/// A TCP-only build links no QUIC stack.
#[test]
fn ha_transport_tcp_links_no_quinn() {
    assert_no(
        "ha-transport-tcp",
        &["quinn", "quinn-proto", "ha-transport-quic"],
    );
    // The shared TLS home links no QUIC stack either.
    assert_no("ha-tls", &["quinn", "quinn-proto"]);
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != "target" && name != "tests" && name != "benches" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn shipped_code_has_no_stubs() {
    let mut files = Vec::new();
    rust_files(&workspace_root(), &mut files);
    assert!(files.len() > 10, "found too few sources: {}", files.len());
    let needles = [concat!("todo", "!("), concat!("unimplemented", "!(")];
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for n in needles {
            assert!(!text.contains(n), "{} contains {n}", f.display());
        }
    }
}

/// The engine is sans-IO and deterministic (docs/protocol.md; ARCHITECTURE.md,
/// `ha-core`): its files name no runtime, clock, file system, network, thread or
/// unseeded randomness. The executor, the one place that runs its actions, names
/// no clock or runtime either: its host supplies time.
#[test]
fn the_engine_and_executor_touch_no_clock_disk_network_thread_or_randomness() {
    let root = workspace_root().join("ha-core/src");
    let banned = [
        "tokio",
        "std::time::Instant",
        "SystemTime",
        "std::fs",
        "std::net",
        "std::thread",
        "thread::spawn",
        "rand::",
        "thread_rng",
        "getrandom",
    ];
    let mut checked = 0;
    for dir in ["engine", "executor"] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        for f in files {
            checked += 1;
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for b in banned {
                    assert!(
                        !code.contains(b),
                        "{}:{} uses `{b}`: {line}",
                        f.display(),
                        n + 1
                    );
                }
            }
        }
    }
    assert!(
        checked >= 8,
        "found only {checked} engine and executor files"
    );
}

/// A file is a room with one purpose: no source file passes ~800 lines unless
/// its first lines say why.
#[test]
fn no_source_file_passes_800_lines_without_a_reason_at_its_top() {
    let mut files = Vec::new();
    rust_files(&workspace_root(), &mut files);
    for dir in [
        "ha-core",
        "ha-wal",
        "ha-transport-quic",
        "ha-transport-tcp",
        "ha-node",
        "xtask",
    ] {
        for sub in ["tests", "benches", "examples"] {
            let mut more = Vec::new();
            rust_files(&workspace_root().join(dir).join(sub), &mut more);
            files.extend(more);
        }
    }
    let mut long = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines = text.lines().count();
        let head: String = text.lines().take(12).collect::<Vec<_>>().join("\n");
        if lines > 850 && !head.contains("Longer than 800 lines because") {
            long.push(format!("{} ({lines} lines)", f.display()));
        }
    }
    assert!(
        long.is_empty(),
        "split these along their seams, or say why at the top: {long:?}"
    );
}
