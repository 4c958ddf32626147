//! The stdio front: an agent that launches its MCP server itself launches
//! `mcp-guard stdio --server NAME --policy FILE` instead. mcp-guard starts the real server and
//! runs every message through the same pipeline as the HTTP front; newline-delimited JSON-RPC
//! on stdin/stdout, diagnostics on stderr.
//!
//! Requests are handled concurrently (pipelined requests may be answered in any order); one
//! writer task owns stdout so lines never interleave.

use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::identity::TransportHints;
use crate::mcp::jsonrpc;
use crate::proxy::{AgentSession, Proxy};

/// Serves one agent on stdin/stdout until stdin ends.
pub async fn serve(proxy: Arc<Proxy>, session: Arc<AgentSession>) -> std::io::Result<()> {
    let (to_stdout, lines_out) = mpsc::channel::<Value>(256);
    let writer = tokio::spawn(write_stdout(lines_out));
    let forwarder = session.take_outbox().await.map(|mut outbox| {
        let to_stdout = to_stdout.clone();
        tokio::spawn(async move {
            while let Some(message) = outbox.recv().await {
                if to_stdout.send(message).await.is_err() {
                    break;
                }
            }
        })
    });
    let mut handlers = tokio::task::JoinSet::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    loop {
        // Raw bytes, not text: a line that is not UTF-8 gets a JSON-RPC error, not an exit.
        let mut line = Vec::new();
        if stdin.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let proxy = proxy.clone();
        let session = session.clone();
        let to_stdout = to_stdout.clone();
        handlers.spawn(async move {
            let answer = match jsonrpc::parse(&line, &proxy.limits) {
                Ok(incoming) => {
                    proxy
                        .handle(&session, incoming, &TransportHints::default())
                        .await
                }
                Err(error) => Some(error.to_value()),
            };
            if let Some(answer) = answer {
                let _ = to_stdout.send(answer).await;
            }
        });
    }
    // The agent closed stdin: answer what is in flight, then stop the server.
    while handlers.join_next().await.is_some() {}
    if let Some(forwarder) = forwarder {
        forwarder.abort();
    }
    drop(to_stdout);
    proxy.end_all_sessions().await;
    drop(session);
    let _ = writer.await;
    Ok(())
}

async fn write_stdout(mut lines: mpsc::Receiver<Value>) {
    let mut stdout = tokio::io::stdout();
    while let Some(value) = lines.recv().await {
        let mut line = value.to_string();
        line.push('\n');
        if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
            break;
        }
    }
}
