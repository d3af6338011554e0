//! What crosses the wire, as bytes: framing of device input, the device
//! protocol (requests, replies), the Kafka envelopes both ways, and message
//! ids. Pure: no I/O, and nothing else of the crate is imported here.

pub mod frame;
pub mod ids;
pub mod protocol;
