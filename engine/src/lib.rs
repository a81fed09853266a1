//! graphbuild's engine: expands a [`graphbuild_lang::ir::Project`] into a graph of
//! (stage × platform) nodes, runs it, and writes OCI image layouts.
//!
//! No terminal, no CLI: progress leaves through [`events`], errors are miette diagnostics.

pub mod attest;
pub mod binfmt;
pub mod build;
pub mod chmod;
mod context;
mod copy;
mod copy_parents;
pub mod decompress;
pub mod digest;
mod dockerignore;
pub mod events;
pub mod execution;
pub mod explain;
pub mod exporter;
pub mod fetch;
mod fsutil;
pub mod git_source;
mod key;
pub mod layer;
pub mod oci;
pub mod plan;
pub mod push;
pub mod reapi;
pub mod reference;
pub mod registry;
pub mod remote;
pub mod resolve;
pub mod rootless;
pub mod sandbox;
pub mod scheduler;
pub mod ssh;
pub mod state;
pub mod store;
pub mod unpack;
pub mod verify;
