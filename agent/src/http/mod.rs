//! HTTP: the agent's API server (`/v1/recognize`, `/v1/status`, `/v1/fleet`, `/metrics`, rendering
//! `crate::metrics`) and the shop page (`/`), and the one client that reads an agent's API.

#[cfg(feature = "daemon")]
mod api;
pub mod client;
#[cfg(feature = "daemon")]
mod events;
#[cfg(feature = "daemon")]
pub mod gate;
#[cfg(feature = "daemon")]
pub mod server;
#[cfg(feature = "daemon")]
pub mod shop;

#[cfg(feature = "daemon")]
pub use api::{AppState, FleetFn, StatusFn, router, status_code};
pub use client::{ClientError, get_as, get_fleet, get_json, get_status, request, request_json};
#[cfg(feature = "daemon")]
pub use server::serve;
