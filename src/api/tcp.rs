//! The API over TCP with mTLS (`[api.tcp]`). SKELETON: the transport is
//! being built; only its configuration exists.

use std::net::SocketAddr;

use serde::Deserialize;

/// `[api.tcp]`: serve the API on TCP with mTLS, presenting our own
/// X509-SVID from the Workload API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Workload API endpoint our SVID comes from (`unix:///…` or
    /// `tcp://IP:port`).
    pub workload_api: String,
    /// Which of our SVIDs to present (default: the first the Workload API
    /// hands out).
    #[serde(default)]
    pub spiffe_id: Option<String>,
}

/// What a TCP connection tells the API about its caller: set by the mTLS
/// acceptor (tonic `Connected::connect_info`), read by authorization
/// through `req.extensions().get::<TcpConnectInfo>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnectInfo {
    /// The remote address.
    pub remote: SocketAddr,
    /// The SPIFFE ID of the caller's X509-SVID, verified against our trust
    /// bundle during the handshake (`None` never reaches a handler: a
    /// caller without a valid SVID fails the handshake).
    pub peer_spiffe_id: Option<String>,
}
