//! The Remote Workers API (`google.devtools.remoteworkers.v1test2`), the part a bot speaks:
//! `Bots.CreateBotSession` and `Bots.UpdateBotSession`.
//!
//! The published `bazel-remote-apis` crate has no bindings for it, so the messages are
//! declared here with prost's derive (field numbers from `bots.proto` and `worker.proto`,
//! as BuildGrid 0.9 serves them) and called through tonic's generic client with prost's
//! codec: no protobuf compiler, no hand-encoded bytes.

use bazel_remote_apis::google::protobuf::{Any, Timestamp};
use bazel_remote_apis::google::rpc::Status;

/// The `Bots` service's method paths.
pub const CREATE_BOT_SESSION: &str = "/google.devtools.remoteworkers.v1test2.Bots/CreateBotSession";
pub const UPDATE_BOT_SESSION: &str = "/google.devtools.remoteworkers.v1test2.Bots/UpdateBotSession";

/// The type URL of an `Any` holding an REAPI message named `name` (`Action`, `Digest`…).
pub fn reapi_type_url(name: &str) -> String {
    format!("type.googleapis.com/build.bazel.remote.execution.v2.{name}")
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BotSession {
    /// Assigned by the server on creation: `{parent}/botSessions/{id}`.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub bot_id: String,
    #[prost(enumeration = "BotStatus", tag = "3")]
    pub status: i32,
    #[prost(message, optional, tag = "4")]
    pub worker: Option<Worker>,
    #[prost(message, repeated, tag = "5")]
    pub leases: Vec<Lease>,
    #[prost(message, optional, tag = "6")]
    pub expire_time: Option<Timestamp>,
    #[prost(string, tag = "7")]
    pub version: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum BotStatus {
    Unspecified = 0,
    Ok = 1,
    Unhealthy = 2,
    HostRebooting = 3,
    BotTerminating = 4,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LeaseState {
    Unspecified = 0,
    Pending = 1,
    Active = 2,
    Completed = 4,
    Cancelled = 5,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Lease {
    #[prost(string, tag = "7")]
    pub id: String,
    /// BuildGrid: the `Action` (or its `Digest`) to execute.
    #[prost(message, optional, tag = "8")]
    pub payload: Option<Any>,
    /// The bot's answer: an `ActionResult`.
    #[prost(message, optional, tag = "9")]
    pub result: Option<Any>,
    #[prost(enumeration = "LeaseState", tag = "2")]
    pub state: i32,
    #[prost(message, optional, tag = "3")]
    pub status: Option<Status>,
    #[prost(message, optional, tag = "4")]
    pub requirements: Option<Worker>,
    #[prost(message, optional, tag = "5")]
    pub expire_time: Option<Timestamp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Worker {
    #[prost(message, repeated, tag = "1")]
    pub devices: Vec<Device>,
    #[prost(message, repeated, tag = "2")]
    pub properties: Vec<Property>,
}

/// `Worker.Property` and `Device.Property` alike: a key and a value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Property {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Device {
    #[prost(string, tag = "1")]
    pub handle: String,
    #[prost(message, repeated, tag = "2")]
    pub properties: Vec<Property>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateBotSessionRequest {
    #[prost(string, tag = "1")]
    pub parent: String,
    #[prost(message, optional, tag = "2")]
    pub bot_session: Option<BotSession>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateBotSessionRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub bot_session: Option<BotSession>,
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn a_lease_encodes_with_the_protos_field_numbers() {
        let lease = Lease {
            id: "x".into(),
            state: LeaseState::Active as i32,
            ..Default::default()
        };
        // Field 7 (id), length-delimited: tag 0x3a; field 2 (state), varint: tag 0x10.
        assert_eq!(lease.encode_to_vec(), vec![0x10, 2, 0x3a, 1, b'x']);
    }
}
