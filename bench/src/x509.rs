//! Scenario 1, `x509`: `SignX509` with one item (a new CSR each time)
//! through the server's whole request path: mutual TLS, agent
//! authentication, authorization of the entry, policy, rate limiter (set to
//! unlimited), signing, the issued-credential record and the audit record.
//! One TCP + TLS connection (HTTP/2) per concurrent client, one request in
//! flight on each, all as the same attested agent.

use std::sync::Arc;

use anyhow::{Context as _, Result, anyhow};
use mayfly::proto::node::node_client::NodeClient;
use mayfly::proto::node::{SignX509Request, X509SignItem};
use tonic::transport::Channel;

use crate::crypto::Ceiling;
use crate::harness::{Row, Server, Worker, measure_variant};
use crate::scenario::{Csrs, Settings, check_svid, register, x509_budget};

struct SignWorker {
    client: NodeClient<Channel>,
    entry_id: String,
    spiffe_id: String,
    csrs: Arc<Csrs>,
    index: usize,
    calls: u64,
    check_every: bool,
}

impl Worker for SignWorker {
    async fn call(&mut self) -> Result<()> {
        let csr = self.csrs.get(self.index, self.calls).to_vec();
        self.calls += 1;
        let resp = self
            .client
            .sign_x509(SignX509Request {
                items: vec![X509SignItem {
                    entry_id: self.entry_id.clone(),
                    csr,
                    task_id: String::new(),
                }],
            })
            .await
            .map_err(|s| anyhow!("SignX509: {:?} {}", s.code(), s.message()))?
            .into_inner();
        if self.check_every || self.calls == 1 {
            let result = resp.results.first().context("SignX509: no result")?;
            let leaf = result.svid_chain.first().context("SignX509: no SVID")?;
            check_svid(leaf, &self.spiffe_id)?;
        }
        Ok(())
    }
}

/// Runs the scenario on a new server; one row per concurrency.
pub async fn run(settings: &Settings, csrs: &Arc<Csrs>, ceiling: Ceiling) -> Result<Vec<Row>> {
    let mut server = Server::start()?;
    let reg = register(&server, "bench/x509").await?;
    let mut rows = Vec::new();
    for &c in &settings.concurrencies {
        let mut workers = Vec::with_capacity(c);
        for index in 0..c {
            workers.push(SignWorker {
                client: crate::node_client::connect(server.node_addr, Some(&reg.agent)).await?,
                entry_id: reg.entry_id.clone(),
                spiffe_id: reg.spiffe_id.clone(),
                csrs: Arc::clone(csrs),
                index,
                calls: 0,
                check_every: settings.smoke,
            });
        }
        let mut row = measure_variant(
            &mut server,
            "x509",
            "SignX509, 1 item",
            workers,
            settings.duration,
        )
        .await?;
        row.ratio_to_ceiling = Some(row.per_second / ceiling.x509_per_second);
        x509_budget(&mut row);
        eprintln!("{}", row.progress());
        rows.push(row);
    }
    server.stop();
    Ok(rows)
}
