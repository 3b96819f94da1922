//! The MQTT broker and subscriber the tests use: the tools' own ([`deckhand_tools::shop::mqtt`], which
//! the counter benchmark uses too).

pub use deckhand_tools::shop::mqtt::{Broker, Message, Subscriber};
