//! Scenario 2, `jwt`: `MintJwt` through the server's whole request path
//! (as `x509`: mutual TLS, authentication, authorization, policy, signing,
//! the issued-credential and audit records), one audience. One connection
//! per concurrent client, one request in flight on each.

use anyhow::{Result, anyhow};
use mayfly::proto::node::MintJwtRequest;
use mayfly::proto::node::node_client::NodeClient;
use tonic::transport::Channel;

use crate::crypto::Ceiling;
use crate::harness::{Row, Server, Worker, measure_variant};
use crate::scenario::{Settings, check_jwt, jwt_budget, register};

const AUDIENCE: &str = "bench";

struct MintWorker {
    client: NodeClient<Channel>,
    entry_id: String,
    spiffe_id: String,
    calls: u64,
    check_every: bool,
}

impl Worker for MintWorker {
    async fn call(&mut self) -> Result<()> {
        self.calls += 1;
        let resp = self
            .client
            .mint_jwt(MintJwtRequest {
                entry_id: self.entry_id.clone(),
                audience: vec![AUDIENCE.to_owned()],
                task_id: String::new(),
            })
            .await
            .map_err(|s| anyhow!("MintJwt: {:?} {}", s.code(), s.message()))?
            .into_inner();
        if self.check_every || self.calls == 1 {
            check_jwt(&resp.token, &self.spiffe_id, AUDIENCE)?;
        }
        Ok(())
    }
}

/// Runs the scenario on a new server; one row per concurrency.
pub async fn run(settings: &Settings, ceiling: Ceiling) -> Result<Vec<Row>> {
    let mut server = Server::start()?;
    let reg = register(&server, "bench/jwt").await?;
    let mut rows = Vec::new();
    for &c in &settings.concurrencies {
        let mut workers = Vec::with_capacity(c);
        for _ in 0..c {
            workers.push(MintWorker {
                client: crate::node_client::connect(server.node_addr, Some(&reg.agent)).await?,
                entry_id: reg.entry_id.clone(),
                spiffe_id: reg.spiffe_id.clone(),
                calls: 0,
                check_every: settings.smoke,
            });
        }
        let mut row = measure_variant(
            &mut server,
            "jwt",
            "MintJwt, 1 audience",
            workers,
            settings.duration,
        )
        .await?;
        row.ratio_to_ceiling = Some(row.per_second / ceiling.jwt_per_second);
        jwt_budget(&mut row);
        eprintln!("{}", row.progress());
        rows.push(row);
    }
    server.stop();
    Ok(rows)
}
