//! A client for our API, used by tests, the benchmark and reporters
//! written in Rust.

use std::path::PathBuf;
use std::time::Duration;

use futures::Stream;
use tonic::Status;
use tonic::transport::Channel;

use super::ApiError;
use crate::endpoint::Endpoint;
use crate::proto::healer::supervisor_client::SupervisorClient;
use crate::proto::healer::{ReportHandshakesRequest, ReportHandshakesResponse};

/// How long one dial of the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A `Supervisor` client on a Unix socket. Cheap to clone; clones share
/// one connection, which multiplexes concurrent streams.
#[derive(Debug, Clone)]
pub struct ReportClient {
    inner: SupervisorClient<Channel>,
}

impl ReportClient {
    /// A client for the API socket at `path`. Nothing is dialled until the
    /// first call; a failed dial is that call's error.
    ///
    /// # Errors
    /// [`ApiError::Channel`] if tonic rejects the endpoint.
    ///
    /// # Panics
    /// Outside a tokio runtime (tonic spawns the channel's worker task).
    pub fn connect_unix(path: impl Into<PathBuf>) -> Result<Self, ApiError> {
        let channel = Endpoint::Unix(path.into())
            .channel(CONNECT_TIMEOUT)
            .map_err(ApiError::Channel)?;
        Ok(Self {
            inner: SupervisorClient::new(channel),
        })
    }

    /// Sends `batches` as one `ReportHandshakes` stream and returns the
    /// server's totals once the stream ends.
    ///
    /// # Errors
    /// The server's status (see the RPC's documentation in
    /// `proto/spire_healer/v1/healer.proto`) or a transport failure.
    pub async fn report(
        &self,
        batches: impl Stream<Item = ReportHandshakesRequest> + Send + 'static,
    ) -> Result<ReportHandshakesResponse, Status> {
        let mut client = self.inner.clone();
        client
            .report_handshakes(batches)
            .await
            .map(tonic::Response::into_inner)
    }
}
