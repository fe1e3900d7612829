//! The library's modules import one another without a cycle: no module uses, directly or
//! through others, a module that uses it back. A module may use what its ancestors define
//! (that is how Rust's privacy works: a parent's private items are its children's), so an edge
//! from a module to one of its ancestors does not count; a parent's re-export (`pub use`) is
//! followed to the module that defines the item. Read from the source, not the compiler: `use`
//! declarations and the paths written inline (`crate::…`, `super::…`, `child::…`), test
//! modules left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

fn name(module: &Module) -> String {
    if module.is_empty() { "crate".into() } else { module.join("::") }
}

/// Every module of the library, by path, with its source (test modules cut off).
fn modules() -> BTreeMap<Module, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<Module, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "bin" {
                    walk(&path, root, out);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(root).unwrap().with_extension("");
            let mut module: Module = relative.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if module.last().is_some_and(|l| l == "mod" || l == "lib") {
                module.pop();
            }
            out.insert(module, without_tests(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The source without line comments and from its first `#[cfg(test)] mod` on.
fn without_tests(source: &str) -> String {
    let code: String = source.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut cut = code.len();
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]") {
        let at = from + at;
        if code[at + "#[cfg(test)]".len()..].trim_start().starts_with("mod ") {
            cut = at;
            break;
        }
        from = at + 1;
    }
    code[..cut].to_owned()
}

/// The paths a `use` tree names: `a::{b, c::{d, e as f}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or("").trim();
        return vec![path.split("::").map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()];
    };
    let prefix: Vec<String> = tree[..open].split("::").map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut parts, mut current, mut depth) = (Vec::new(), String::new(), 0);
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
        .iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(|p| expand(p))
        .map(|tail| prefix.iter().cloned().chain(tail).collect())
        .collect()
}

/// The trees of every `use` (and, with `public_only`, every `pub use`) in `code`.
fn use_trees(code: &str, public_only: bool) -> Vec<String> {
    let mut trees = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(at) = code[from..].find("use ") {
        let at = from + at;
        from = at + 4;
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        let public = code[..at].trim_end().ends_with("pub") || code[..at].trim_end().ends_with(')');
        if public_only && !public {
            continue;
        }
        if let Some(end) = code[at..].find(';') {
            trees.push(code[at + 4..at + end].to_owned());
        }
    }
    trees
}

/// Paths written inline: `crate::a::b`, `super::x`, `self::y`, `child::z`.
fn inline_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut chars = code.chars().peekable();
    let mut after_colons = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            if !after_colons && words.len() > 1 {
                paths.push(std::mem::take(&mut words));
            }
            if !after_colons {
                words.clear();
            }
            words.push(std::mem::take(&mut word));
            after_colons = false;
        }
        if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            after_colons = true;
        } else if !c.is_whitespace() || !after_colons {
            if words.len() > 1 {
                paths.push(std::mem::take(&mut words));
            }
            words.clear();
            after_colons = false;
        }
    }
    paths
}

struct Graph {
    modules: BTreeMap<Module, String>,
    /// Per module, the names it re-exports and the module defining each.
    reexports: BTreeMap<Module, BTreeMap<String, Module>>,
}

impl Graph {
    /// The module a path from `module` leads to, if it leads into the library.
    fn resolve(&self, module: &Module, path: &[String]) -> Option<Module> {
        let (mut current, rest): (Module, &[String]) = match path.first().map(String::as_str) {
            Some("crate") => (Vec::new(), &path[1..]),
            Some("self") => (module.clone(), &path[1..]),
            Some("super") => {
                let mut base = module.clone();
                let mut rest = path;
                while rest.first().is_some_and(|s| s == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                (base, rest)
            }
            Some(first) => {
                let mut child = module.clone();
                child.push(first.to_owned());
                if !self.modules.contains_key(&child) {
                    return None;
                }
                (module.clone(), path)
            }
            None => return None,
        };
        for segment in rest {
            let mut next = current.clone();
            next.push(segment.clone());
            if self.modules.contains_key(&next) {
                current = next;
            } else {
                return Some(self.reexports.get(&current).and_then(|r| r.get(segment)).cloned().unwrap_or(current));
            }
        }
        Some(current)
    }
}

fn graph() -> (Graph, BTreeMap<Module, BTreeSet<Module>>) {
    let modules = modules();
    let mut graph = Graph { modules, reexports: BTreeMap::new() };
    // Re-exports first (twice, for one re-exporting another's).
    for _ in 0..2 {
        let mut reexports = BTreeMap::new();
        for (module, code) in &graph.modules {
            let mut names = BTreeMap::new();
            for tree in use_trees(code, true) {
                for path in expand(&tree) {
                    let mut dir = path.clone();
                    let Some(item) = dir.pop() else { continue };
                    dir.push(item.clone());
                    if let Some(target) = graph.resolve(module, &dir)
                        && &target != module
                    {
                        names.insert(item, target);
                    }
                }
            }
            reexports.insert(module.clone(), names);
        }
        graph.reexports = reexports;
    }
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, code) in &graph.modules {
        let paths = use_trees(code, false).into_iter().flat_map(|t| expand(&t)).chain(inline_paths(code));
        for path in paths {
            let Some(target) = graph.resolve(module, &path) else { continue };
            // Itself, or an ancestor's own items.
            if target == *module || module.starts_with(&target) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    (graph, edges)
}

/// A cycle through the edges, if any: the modules on it, in order.
fn find_cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        at: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, bool>,
        path: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        state.insert(at.clone(), false);
        path.push(at.clone());
        for next in edges.get(at).into_iter().flatten() {
            match state.get(next) {
                Some(false) => {
                    let start = path.iter().position(|m| m == next).unwrap();
                    return Some(path[start..].iter().cloned().chain([next.clone()]).collect());
                }
                Some(true) => {}
                None => {
                    if let Some(cycle) = visit(next, edges, state, path) {
                        return Some(cycle);
                    }
                }
            }
        }
        path.pop();
        state.insert(at.clone(), true);
        None
    }
    let mut state = BTreeMap::new();
    for module in edges.keys() {
        if !state.contains_key(module)
            && let Some(cycle) = visit(module, edges, &mut state, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let (graph, edges) = graph();
    assert!(graph.modules.len() > 50, "read {} modules: is src/ where it was?", graph.modules.len());
    if let Some(cycle) = find_cycle(&edges) {
        panic!("an import cycle: {}", cycle.iter().map(name).collect::<Vec<_>>().join(" -> "));
    }
}

#[test]
fn the_reader_sees_imports_inline_paths_and_re_exports() {
    let (graph, edges) = graph();
    let module = |path: &str| -> Module { path.split("::").map(str::to_owned).collect() };
    let uses = |from: &str, to: &str| edges.get(&module(from)).is_some_and(|e| e.contains(&module(to)));
    // A `use` with a group, an inline path, and a re-export followed to where the item lives.
    assert!(uses("hub", "gateway::intake"), "use crate::gateway::intake::{{self, Intake}}");
    assert!(uses("gateway::radio_watch", "gateway::core"), "super::Gateway, re-exported from core");
    assert!(uses("ble::bluez", "ble::bluez::listen"), "listen::listen(..) inline");
    assert_eq!(graph.resolve(&module("hub"), &module("crate::gateway::Gateway")), Some(module("gateway::core")));
    // A made-up cycle is found.
    let mut looped = edges.clone();
    looped.entry(module("gateway::core")).or_default().insert(module("hub"));
    let cycle = find_cycle(&looped).expect("hub -> gateway::core -> hub");
    assert!(cycle.contains(&module("hub")) && cycle.contains(&module("gateway::core")), "{cycle:?}");
}
