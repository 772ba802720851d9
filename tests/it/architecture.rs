//! The dependency rules of ARCHITECTURE.md ("Architecture invariants"),
//! checked on the source text: a rule that is only written down drifts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module of each file of the `tally` crate, with its source.
fn core_files() -> Vec<(String, PathBuf, String)> {
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).expect("under src").to_path_buf();
            let first = rel
                .components()
                .next()?
                .as_os_str()
                .to_string_lossy()
                .to_string();
            let module = first.trim_end_matches(".rs").to_string();
            (module != "lib").then(|| {
                let text = std::fs::read_to_string(&p).expect("readable source");
                (module, rel, text)
            })
        })
        .collect()
}

/// `crate::<module>` references of a source text.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn the_module_graph_has_no_cycles() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, _, text) in core_files() {
        let deps = crate_refs(&text);
        graph
            .entry(module.clone())
            .or_default()
            .extend(deps.into_iter().filter(|d| *d != module));
    }
    assert!(graph.len() > 10, "found the modules of src/: {graph:?}");
    // Depth-first search; a grey node reached again closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match colour.get(next.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == next).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, colour, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        colour.insert(node.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for node in graph.keys() {
        if !colour.contains_key(node.as_str()) {
            let cycle = visit(node, &graph, &mut colour, &mut Vec::new());
            assert!(
                cycle.is_none(),
                "import cycle between modules: {}",
                cycle.unwrap_or_default().join(" -> ")
            );
        }
    }
}

#[test]
fn only_the_http_layer_knows_http() {
    for (module, file, text) in core_files() {
        if module == "http" {
            continue;
        }
        for word in ["axum", "hyper", "StatusCode"] {
            assert!(
                !text.contains(word),
                "src/{} names `{word}`: only src/http/ may know HTTP",
                file.display()
            );
        }
    }
}

#[test]
fn the_store_and_the_aggregate_model_know_no_later_stage() {
    let later = [
        "http",
        "alert",
        "projection",
        "query",
        "ingest",
        "jobs",
        "app",
        "config",
    ];
    for (module, file, text) in core_files() {
        if module != "store" && module != "aggregate" {
            continue;
        }
        let refs = crate_refs(&text);
        for stage in later {
            assert!(
                !refs.contains(stage),
                "src/{} imports crate::{stage}: the {module} layer must not know it",
                file.display()
            );
        }
    }
}

#[test]
fn the_product_does_not_depend_on_its_tooling() {
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).expect("Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("a [dependencies] table");
    assert!(
        !deps.contains("tally-cli"),
        "the tally crate must not depend on tally-cli"
    );
    for (_, file, text) in core_files() {
        assert!(
            !text.contains("tally_cli"),
            "src/{} names tally_cli: the product never imports its tooling",
            file.display()
        );
    }
}
