//! The library's SONAME is its own name, so a binary linked against it (through a link-time alias) loads
//! `libdeckhand_hailort_standin.so` at run time, never something called HailoRT.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libdeckhand_hailort_standin.so");
}
