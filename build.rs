//! Build script: links the daemon's serving code together.
//!
//! A hub has little RAM, and the kernel maps an executable's code 64 KiB at a time around
//! each page fault (fault-around). Laid out as the compiler leaves it, the code a serving
//! daemon runs is spread over nearly all of its 8 MB, so nearly all of it stays resident. The
//! release build of `lockhub` on x86-64 therefore asks the linker to put the functions named
//! in `packaging/hot-code.order` first, in that order: the functions `lockhub run` ran while
//! serving in a profiled run of the remote-unlock benchmark. Start-up code is handed back once
//! the daemon serves (`src/bin/lockhub/text_pages.rs`) and then stays away. Regenerate the list
//! with `packaging/profile-hot-code` after changes to what the daemon runs; a stale list only
//! costs memory (names it gives that no longer exist are skipped), never correctness.
//!
//! Only where the linker is LLD, which takes `--symbol-ordering-file` (Rust's default on
//! x86_64-unknown-linux-gnu since 1.90); the cross builds for the Pi link with GNU ld, which
//! does not. `LOCKHUB_HOT_CODE_ORDER=0` turns it off.

use std::env;
use std::path::Path;

const ORDER: &str = "packaging/hot-code.order";

fn main() {
    println!("cargo:rerun-if-env-changed=LOCKHUB_HOT_CODE_ORDER");
    let target = env::var("TARGET").unwrap_or_default();
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let off = env::var("LOCKHUB_HOT_CODE_ORDER").is_ok_and(|v| v == "0");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    // A build that chose its linker (packaging/build-deb's cross builds: the target's gcc, so
    // GNU ld) or switched LLD off keeps a build that links.
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let other_linker = env::var_os("RUSTC_LINKER").is_some()
        || flags
            .split('\x1f')
            .any(|f| f.contains("linker-features=-lld") || f.trim_start_matches("-C").starts_with("linker="));
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(ORDER);
    // A path that does not exist would make cargo run this script, and rebuild the crate, on
    // every build: without the list, its directory is watched instead.
    let watched = if order.is_file() { ORDER } else { "packaging" };
    println!("cargo:rerun-if-changed={watched}");
    if target != "x86_64-unknown-linux-gnu" || !release || off || other_linker || !order.is_file() {
        return;
    }
    println!("cargo:rustc-link-arg-bin=lockhub=-Wl,--symbol-ordering-file={}", order.display());
    // The list comes from one build; names another build lacks are expected, not news.
    println!("cargo:rustc-link-arg-bin=lockhub=-Wl,--no-warn-symbol-ordering");
}
