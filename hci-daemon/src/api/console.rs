//! Serial consoles: the `Console` RPC bridges a gRPC stream to a byte stream
//! supplied by a [`ConsoleProvider`] (the VM controller, once it exists).

use std::fmt::Debug;
use std::pin::Pin;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::{Status, Streaming};

use super::status::{ResultExt, to_status};
use crate::proto;

/// A console connection: bytes to and from a guest's serial port.
pub trait ConsoleIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> ConsoleIo for T {}

/// Opens the serial console of a running VM.
#[async_trait]
pub trait ConsoleProvider: Send + Sync + Debug {
    /// Connects to the console of the VM named `vm`. A VM that is not
    /// running on this node is `Unavailable` or `NotFound`.
    async fn open(&self, vm: &str) -> hci_core::Result<Box<dyn ConsoleIo>>;
}

/// The stream type of the `Console` method.
pub type ConsoleStream = Pin<Box<dyn Stream<Item = Result<proto::ConsoleOutput, Status>> + Send>>;

/// Runs one console session: reads the VM name from the first message,
/// connects, then pumps bytes both ways until either side closes.
pub(crate) async fn session(
    provider: &dyn ConsoleProvider,
    resources: &crate::resources::ResourceStore,
    mut input: Streaming<proto::ConsoleInput>,
) -> Result<ConsoleStream, Status> {
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the first console message must name the VM"))?;
    if first.name.is_empty() {
        return Err(Status::invalid_argument(
            "the first console message must name the VM",
        ));
    }
    resources
        .get::<hci_core::model::VirtualMachine>(&first.name)
        .await
        .or_status()?;
    let io = provider.open(&first.name).await.or_status()?;
    let (reader, mut writer) = tokio::io::split(io);
    let vm = first.name.clone();
    tokio::spawn(async move {
        let mut pending = Some(first.data);
        loop {
            let data = match pending.take() {
                Some(data) => data,
                None => match input.message().await {
                    Ok(Some(msg)) => msg.data,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(vm, error = %e, "console input ended");
                        break;
                    }
                },
            };
            if !data.is_empty() && writer.write_all(&data).await.is_err() {
                break;
            }
        }
        // Best effort: the guest side may already be gone.
        let _ = writer.shutdown().await;
    });
    let output = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        let mut buf = vec![0u8; 4096];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(proto::ConsoleOutput { data: buf }), Some(reader)))
            }
            Err(e) => Some((
                Err(to_status(hci_core::Error::io("read the VM console", e))),
                None,
            )),
        }
    });
    Ok(output.boxed())
}
