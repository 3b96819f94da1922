//! Lets the `hailo` feature link against a HailoRT installed outside the standard paths: set
//! DECKHAND_HAILORT_LIB_DIR to the directory holding libhailort.so. (Tests point it at a directory whose
//! libhailort.so is a link-time alias of the test stand-in library; see .ci/run.)
fn main() {
    println!("cargo:rerun-if-env-changed=DECKHAND_HAILORT_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_HAILO").is_some()
        && let Some(dir) = std::env::var_os("DECKHAND_HAILORT_LIB_DIR")
    {
        println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
    }
}
