//! The byte path of one client connection: bytes copied both ways with a
//! fixed buffer per direction (no allocation per byte or per read), a
//! half-close passed on (when one side finishes sending, the other side's
//! write half is shut down and the opposite direction keeps flowing), and
//! backpressure respected (a side that does not read stops the copy from
//! the other, it never buffers more than one buffer).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Bytes per direction held in flight.
pub const BUFFER: usize = 64 * 1024;

/// How many bytes went each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub to_backend: u64,
    pub to_client: u64,
}

/// Relays between `client` and `backend` until both directions finished,
/// after writing `preface` (a PROXY header, or nothing) to the backend.
pub async fn relay<C, B>(client: &mut C, backend: &mut B, preface: &[u8]) -> io::Result<Copied>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !preface.is_empty() {
        backend.write_all(preface).await?;
    }
    let (to_backend, to_client) =
        tokio::io::copy_bidirectional_with_sizes(client, backend, BUFFER, BUFFER).await?;
    Ok(Copied {
        to_backend,
        to_client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A client, the proxy's two sockets, and a backend, all on loopback.
    async fn pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("[::1]:0").await.unwrap();
            let dial = TcpStream::connect(l.local_addr().unwrap());
            let (a, b) = tokio::join!(dial, l.accept());
            (a.unwrap(), b.unwrap().0)
        }
        let (client, proxy_in) = pair().await;
        let (proxy_out, backend) = pair().await;
        (client, proxy_in, proxy_out, backend)
    }

    #[tokio::test]
    async fn a_half_close_passes_through_and_the_answer_still_comes_back() {
        let (mut client, mut proxy_in, mut proxy_out, mut backend) = pairs().await;
        let proxy =
            tokio::spawn(async move { relay(&mut proxy_in, &mut proxy_out, b"HEAD").await });
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        // The backend sees the preface, the request, then end of stream.
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HEADping");
        // After the client's half-close, the other direction still flows.
        backend.write_all(b"pong").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(
            copied,
            Copied {
                to_backend: 4,
                to_client: 4
            }
        );
    }

    #[tokio::test]
    async fn large_transfers_both_ways_arrive_intact() {
        const SIZE: usize = 8 << 20;
        let (mut client, mut proxy_in, mut proxy_out, mut backend) = pairs().await;
        let proxy = tokio::spawn(async move { relay(&mut proxy_in, &mut proxy_out, b"").await });
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let (mut cr, mut cw) = client.split();
        let (mut br, mut bw) = backend.split();
        let send = async {
            cw.write_all(&data).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let echo_back = async {
            bw.write_all(&data).await.unwrap();
            bw.shutdown().await.unwrap();
        };
        let mut at_backend = Vec::new();
        let mut at_client = Vec::new();
        tokio::join!(
            send,
            echo_back,
            async { br.read_to_end(&mut at_backend).await.unwrap() },
            async { cr.read_to_end(&mut at_client).await.unwrap() },
        );
        assert!(at_backend == data, "client → backend bytes differ");
        assert!(at_client == data, "backend → client bytes differ");
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(copied.to_backend, SIZE as u64);
        assert_eq!(copied.to_client, SIZE as u64);
    }

    #[tokio::test]
    async fn a_backend_that_stops_reading_holds_the_client_back() {
        let (mut client, mut proxy_in, mut proxy_out, backend) = pairs().await;
        let _proxy = tokio::spawn(async move { relay(&mut proxy_in, &mut proxy_out, b"").await });
        // The backend never reads: the client's writes must stall once the
        // kernel buffers and the proxy's one buffer are full, not pile up.
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0usize;
        let stalled = loop {
            match tokio::time::timeout(std::time::Duration::from_secs(1), client.write_all(&chunk))
                .await
            {
                Ok(Ok(())) => written += chunk.len(),
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => break true,
            }
            if written > 512 << 20 {
                break false;
            }
        };
        assert!(
            stalled,
            "wrote {written} bytes to a backend that never reads"
        );
        drop(backend);
    }
}
