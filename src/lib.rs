//! lockhub: a home-hub gateway for Bluetooth LE smart locks.
//!
//! The crate holds the gateway and everything an integration run needs beside it. See
//! `ARCHITECTURE.md` for the bird's-eye view and the code map.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
// Standard output and error go through `standard_streams`: a reader gone is no panic.
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod auth;
pub mod ble;
pub mod bounded_file;
pub mod cloud;
pub mod config;
pub mod control;
#[cfg(feature = "devtools")]
pub mod devcloud;
pub mod error_report;
#[cfg(feature = "devtools")]
pub mod firmware;
#[cfg(feature = "devtools")]
pub mod fuzz_harness;
pub mod gateway;
pub mod hub;
pub mod local;
pub mod log_filter;
#[cfg(feature = "devtools")]
pub mod memlink;
pub mod outside_text;
pub mod protocol;
pub mod standard_streams;
pub mod stop;
pub mod store;
