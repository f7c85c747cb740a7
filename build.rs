//! Link order of the release binary.
//!
//! `build/link.order` names the functions the request path runs, most
//! instructions first, as the linker sees them (written by
//! `deploy/load/run.sh` with `CALLGRIND=1 ORDER_FILE=build/link.order`).
//! A release build of the `portcullis` binary hands it to the linker
//! (`--symbol-ordering-file`), which puts those functions next to each other
//! at the start of `.text`: about 1.4 MB for the whole request path instead
//! of pages spread over 22 MB, so fewer instruction-TLB and cache misses
//! per request. Measured with both builds serving the same load at once:
//! 2–4% less CPU per request (README, Performance, stop 24).
//!
//! Only LLD reads the file. It is Rust's own linker for x86_64 Linux since
//! 1.90, so the flag is given there and only when the build did not choose
//! another linker; `PORTCULLIS_LINK_ORDER=off` leaves it out. Names a build
//! no longer has (a dependency or the compiler changed) are skipped by the
//! linker: a stale file costs speed, never correctness. Debug builds, tests
//! and benches never see it.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build/link.order");
    println!("cargo:rerun-if-env-changed=PORTCULLIS_LINK_ORDER");
    let Some(dir) = env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = Path::new(&dir).join("build").join("link.order");
    let wanted = env::var("PROFILE").as_deref() == Ok("release")
        && env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu")
        && env::var("PORTCULLIS_LINK_ORDER").as_deref() != Ok("off")
        && order.is_file();
    if !wanted || linker_chosen() || !rustc_links_with_lld() {
        return;
    }
    // The linker reads a copy in OUT_DIR, not the checkout's file: cargo
    // does not rerun a build script when the same target directory builds
    // the crate from another checkout (a git worktree), and the link
    // argument it keeps must not name a file that checkout may have deleted.
    let Some(out) = env::var_os("OUT_DIR") else {
        return;
    };
    let copy = Path::new(&out).join("link.order");
    if std::fs::copy(&order, &copy).is_err() {
        println!("cargo:warning=cannot copy build/link.order to OUT_DIR; linking in default order");
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        copy.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether the build chose its linker itself: then it may not be LLD.
fn linker_chosen() -> bool {
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let own = flags.split('\x1f').any(|f| {
        f.contains("linker") || f.contains("link-self-contained") || f.contains("fuse-ld")
    });
    own || env::var_os("RUSTC_LINKER").is_some()
}

/// Rust links x86_64 Linux binaries with its own LLD from 1.90 on.
fn rustc_links_with_lld() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(release) = text.lines().find_map(|l| l.strip_prefix("release: ")) else {
        return false;
    };
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (1, 90)
}
