//! deckhand's integration tests, one module per story, in one test binary: the tree (aws-sdk-s3, tract,
//! quinn, s3s and the rest) is linked once, and the tests of every story share the harness's threads.
//! Run one story with `cargo test -p deckhand-tests --test suite fleet::`. Three stories are binaries of
//! their own: the Hailo stand-in tests (`tests/hailo.rs`) and the aarch64 test (`tests/aarch64.rs`), each
//! needing a build with its own feature (see tests/run and .ci/run), and the power cuts
//! (`tests/power_cut.rs`), whose FUSE filesystem is served by the test process itself: it runs alone,
//! as it did before the stories were joined (the one time it ran beside the other stories, its
//! filesystem's session ended with ECONNABORTED at an unmount; the cause is not known yet).

mod agent_offline;
mod agent_sync;
mod catalog_repair;
mod counter;
mod demo;
mod discovery;
mod disk_full;
mod events;
mod flaky_s3;
mod fleet;
mod flood;
mod identity;
mod key_rotation;
mod layout;
mod loaders;
mod partition;
mod publish;
mod recognizer;
mod recovery;
mod renewal;
mod rollout;
mod scrub;
mod shop_page;
mod store_crash;
mod year;
