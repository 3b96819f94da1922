//! One request, one response: length-prefixed frames on a QUIC stream (`deckhand_protocol::wire`),
//! each read checked against its limit before anything is allocated.

use super::*;

pub(super) fn unexpected(peer: &str, what: &'static str, r: Response) -> PeerError {
    match r {
        Response::Busy => PeerError::Busy {
            peer: peer.to_owned(),
        },
        Response::NotFound => PeerError::NotFound {
            peer: peer.to_owned(),
        },
        Response::Error { message } => PeerError::Remote {
            peer: peer.to_owned(),
            message,
        },
        _ => PeerError::Unexpected {
            peer: peer.to_owned(),
            what,
        },
    }
}

pub(super) enum FrameError {
    Wire(WireError),
    Io(String),
}

pub(super) async fn read_frame(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    let len = wire::frame_len(header, limit).map_err(FrameError::Wire)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    Ok(body)
}

/// Sends one request on a new stream and reads the one response, all within `timeout`.
pub async fn roundtrip(
    conn: &quinn::Connection,
    peer: &str,
    req: &Request,
    what: &'static str,
    timeout: Duration,
) -> Result<Response, PeerError> {
    let conn_err = |e: String| PeerError::Connection {
        peer: peer.to_owned(),
        why: e,
    };
    let fut = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| conn_err(e.to_string()))?;
        send.write_all(&req.encode())
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        send.finish().map_err(|e| conn_err(e.to_string()))?;
        let body = read_frame(&mut recv, MAX_RESPONSE)
            .await
            .map_err(|e| match e {
                FrameError::Wire(source) => PeerError::Wire {
                    peer: peer.to_owned(),
                    source,
                },
                FrameError::Io(why) => conn_err(why),
            })?;
        Response::decode(&body).map_err(|source| PeerError::Wire {
            peer: peer.to_owned(),
            source,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| PeerError::Timeout {
            peer: peer.to_owned(),
            what,
            after: timeout,
        })?
}

/// Serves one connection's requests with a custom answer function: for tests that need a peer that
/// misbehaves on purpose (the real serving path is [`PeerNode`]).
pub async fn serve_with<F, Fut>(conn: quinn::Connection, answer: F)
where
    F: Fn(Request) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response> + Send,
{
    // The streams' tasks end with the connection.
    let mut streams = tokio::task::JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let answer = answer.clone();
        streams.spawn(async move {
            let Ok(Ok(body)) =
                tokio::time::timeout(READ_REQUEST_TIMEOUT, read_frame(&mut recv, MAX_REQUEST))
                    .await
            else {
                return;
            };
            let resp = match Request::decode(&body) {
                Ok(r) => answer(r).await,
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            };
            let _ = send.write_all(&resp.encode()).await;
            let _ = send.finish();
        });
        while streams.try_join_next().is_some() {}
    }
    streams.abort_all();
}
