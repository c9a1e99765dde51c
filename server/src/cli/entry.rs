//! `mayfly-server entry create|list|show|update|delete`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use http::Method;
use mayfly::entry::{Entry, EntrySpec};
use serde_json::{Value, json};

use super::Conn;
use super::client::{ClientError, encode};
use super::output::{Output, Table, cell, fields, print, print_json};

/// Entry commands.
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create an entry from flags, or entries from a JSON file (--data).
    Create(CreateArgs),
    /// List entries (every page, unless --page-size or --page-token is given).
    List(ListArgs),
    /// Show one entry.
    Show {
        /// The entry id.
        id: String,
    },
    /// Change an entry: the given flags replace those fields, the rest is kept.
    Update(UpdateArgs),
    /// Delete an entry.
    Delete {
        /// The entry id.
        id: String,
    },
    /// Import entries offline into the store of a STOPPED server (the one
    /// --config names): a JSON-lines file, one entry spec per line as
    /// POST /v1/entries takes them. Every line is checked first; one bad
    /// line imports nothing. Audited.
    Import {
        /// The JSON-lines file; "-" reads stdin.
        file: PathBuf,
    },
}

/// The entry fields settable by flags (create and update).
#[derive(Debug, Default, Args)]
pub struct EntryFlags {
    /// SPIFFE ID issued to matching workloads.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// SPIFFE ID of the agent (or node alias) under which the entry applies.
    #[arg(long, value_name = "ID")]
    pub parent_id: Option<String>,
    /// A selector the workload must have, TYPE:VALUE (repeatable; on update,
    /// replaces every selector).
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime, e.g. 1h [default: the server's default_x509_svid_ttl].
    #[arg(long, value_name = "DURATION")]
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID lifetime, e.g. 5m [default: the server's default_jwt_svid_ttl].
    #[arg(long, value_name = "DURATION")]
    pub jwt_svid_ttl: Option<String>,
    /// A DNS name for the X.509-SVID (repeatable; the first is also the CN; on
    /// update, replaces every DNS name).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// task (a credential per task instance, revoked when it ends) or shared
    /// [default: task].
    #[arg(long, value_name = "SCOPE")]
    pub scope: Option<String>,
    /// Least node assurance: low, medium or high [default: none].
    #[arg(long, value_name = "LEVEL")]
    pub min_assurance: Option<String>,
    /// Step-up: the node must have attested within this age, e.g. 10m.
    #[arg(long, value_name = "DURATION")]
    pub max_attestation_age: Option<String>,
    /// The identity may call the admin API (--admin or --admin=false).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub admin: Option<bool>,
    /// The identity may act as a downstream CA (--downstream or --downstream=false).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub downstream: Option<bool>,
    /// A trust domain whose bundle the workload also gets (repeatable; on
    /// update, replaces the list).
    #[arg(long = "federates-with", value_name = "TRUST_DOMAIN")]
    pub federates_with: Vec<String>,
    /// A hint for workloads holding several SVIDs.
    #[arg(long, value_name = "TEXT")]
    pub hint: Option<String>,
}

impl EntryFlags {
    fn is_empty(&self) -> bool {
        self.spiffe_id.is_none()
            && self.parent_id.is_none()
            && self.selectors.is_empty()
            && self.x509_svid_ttl.is_none()
            && self.jwt_svid_ttl.is_none()
            && self.dns_names.is_empty()
            && self.scope.is_none()
            && self.min_assurance.is_none()
            && self.max_attestation_age.is_none()
            && self.admin.is_none()
            && self.downstream.is_none()
            && self.federates_with.is_empty()
            && self.hint.is_none()
    }

    /// Writes the given flags over `spec`.
    fn apply(self, spec: &mut EntrySpec) {
        if let Some(v) = self.spiffe_id {
            spec.spiffe_id = v;
        }
        if let Some(v) = self.parent_id {
            spec.parent_id = v;
        }
        if !self.selectors.is_empty() {
            spec.selectors = self.selectors;
        }
        if let Some(v) = self.x509_svid_ttl {
            spec.x509_svid_ttl = Some(v);
        }
        if let Some(v) = self.jwt_svid_ttl {
            spec.jwt_svid_ttl = Some(v);
        }
        if !self.dns_names.is_empty() {
            spec.dns_names = self.dns_names;
        }
        if let Some(v) = self.scope {
            spec.scope = Some(v);
        }
        if let Some(v) = self.min_assurance {
            spec.min_assurance = Some(v);
        }
        if let Some(v) = self.max_attestation_age {
            spec.max_attestation_age = Some(v);
        }
        if let Some(v) = self.admin {
            spec.admin = v;
        }
        if let Some(v) = self.downstream {
            spec.downstream = v;
        }
        if !self.federates_with.is_empty() {
            spec.federates_with = self.federates_with;
        }
        if let Some(v) = self.hint {
            spec.hint = v;
        }
    }
}

/// `entry create` flags.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The entry's fields.
    #[command(flatten)]
    pub fields: EntryFlags,
    /// Use this entry id instead of a random one.
    #[arg(long, value_name = "ID")]
    pub entry_id: Option<String>,
    /// Create the entries of a JSON file {"entries":[...]} (as POST /v1/entries
    /// takes); "-" reads stdin. Not combined with field flags.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
}

/// `entry list` flags.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only entries with this SPIFFE ID.
    #[arg(long, value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long, value_name = "ID")]
    pub parent_id: Option<String>,
    /// Only entries having this selector.
    #[arg(long, value_name = "TYPE:VALUE")]
    pub selector: Option<String>,
    /// Fetch one page of this many entries (1-1000) and print the next page token.
    #[arg(long, value_name = "N")]
    pub page_size: Option<usize>,
    /// Fetch the page after this token (from a previous page).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

/// `entry update` flags.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The entry id.
    pub id: String,
    /// The fields to change.
    #[command(flatten)]
    pub fields: EntryFlags,
    /// Replace the whole entry with the entry spec in this JSON file (one
    /// object, as PUT /v1/entries/{id} takes); "-" reads stdin. Not combined
    /// with field flags.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
}

/// Runs an entry command.
pub async fn run(conn: &Conn, command: EntryCommand) -> anyhow::Result<ExitCode> {
    if let EntryCommand::Import { file } = command {
        return import(conn, &file);
    }
    let client = conn.client()?;
    match command {
        EntryCommand::Create(args) => {
            let body = create_body(args)?;
            let (value, failed) = match client.post("/v1/entries", Some(&body)).await {
                Ok(v) => (v, false),
                // A batch where no entry was created still lists each result.
                Err(ClientError::Api { body, .. }) if body.get("results").is_some() => (body, true),
                Err(e) => return Err(e.into()),
            };
            let results = value["results"].as_array().cloned().unwrap_or_default();
            let errors = results.iter().filter(|r| r.get("error").is_some()).count();
            match conn.output {
                Output::Json => print_json(&value)?,
                Output::Text => {
                    for (i, r) in results.iter().enumerate() {
                        if let Some(e) = r.get("entry") {
                            print(&format!(
                                "Created entry {} for {} (parent {})\n",
                                cell(&e["id"]),
                                cell(&e["spiffe_id"]),
                                cell(&e["parent_id"])
                            ))?;
                        } else {
                            let spiffe_id = body["entries"][i]["spiffe_id"].as_str().unwrap_or("?");
                            eprintln!(
                                "error: entry {} ({spiffe_id}): {}",
                                i + 1,
                                cell(&r["error"]["message"])
                            );
                        }
                    }
                }
            }
            if failed || errors > 0 {
                if conn.output == Output::Json {
                    eprintln!(
                        "error: {errors} of {} entries were not created",
                        results.len()
                    );
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        EntryCommand::List(args) => list(&client, conn.output, args).await?,
        EntryCommand::Show { id } => {
            let entry = client.get(&format!("/v1/entries/{}", encode(&id))).await?;
            show(conn.output, &entry)?;
        }
        EntryCommand::Update(args) => {
            let path = format!("/v1/entries/{}", encode(&args.id));
            let spec: Value = match args.data {
                Some(file) => {
                    if !args.fields.is_empty() {
                        bail!("--data cannot be combined with field flags");
                    }
                    read_json(&file)?
                }
                None => {
                    if args.fields.is_empty() {
                        bail!("nothing to change: give at least one field flag or --data FILE");
                    }
                    let current: Entry = serde_json::from_value(client.get(&path).await?)
                        .context("the server sent an entry this CLI cannot read")?;
                    let mut spec = current.to_spec();
                    args.fields.apply(&mut spec);
                    serde_json::to_value(spec)?
                }
            };
            let entry = client.json(Method::PUT, &path, Some(&spec)).await?;
            match conn.output {
                Output::Json => print_json(&entry)?,
                Output::Text => {
                    print(&format!("Updated entry {}\n", cell(&entry["id"])))?;
                    show(Output::Text, &entry)?;
                }
            }
        }
        // Offline: handled before a client is made.
        EntryCommand::Import { .. } => {}
        EntryCommand::Delete { id } => {
            let entry = client
                .json(
                    Method::DELETE,
                    &format!("/v1/entries/{}", encode(&id)),
                    None,
                )
                .await?;
            match conn.output {
                Output::Json => print_json(&entry)?,
                Output::Text => print(&format!(
                    "Deleted entry {} ({})\n",
                    cell(&entry["id"]),
                    cell(&entry["spiffe_id"])
                ))?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `entry import`: offline, into the store of the server `--config` names
/// (the development setup without it, as `run`).
fn import(conn: &Conn, file: &Path) -> anyhow::Result<ExitCode> {
    let config = match &conn.config {
        Some(path) => crate::config::ServerConfig::load(path)?,
        None => crate::config::ServerConfig::development(),
    };
    let (input, name) = crate::import::open_input(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let summary = crate::import::run(&config, input, &name, crate::import::local_operator())?;
    match conn.output {
        Output::Json => print_json(&serde_json::to_value(&summary)?)?,
        Output::Text => print(&format!(
            "Imported {} entries into {} (revisions {}-{}, {} durable writes)\n",
            summary.imported,
            config.data_dir.join("store").display(),
            summary.first_revision,
            summary.last_revision,
            summary.batches
        ))?,
    }
    Ok(ExitCode::SUCCESS)
}

fn read_json(file: &Path) -> anyhow::Result<Value> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", file.display()))
}

fn create_body(args: CreateArgs) -> anyhow::Result<Value> {
    if let Some(file) = args.data {
        if !args.fields.is_empty() || args.entry_id.is_some() {
            bail!("--data cannot be combined with field flags or --entry-id");
        }
        let body = read_json(&file)?;
        if !body["entries"].is_array() {
            bail!(
                "{}: expected a JSON object {{\"entries\": [...]}}",
                file.display()
            );
        }
        return Ok(body);
    }
    let f = &args.fields;
    if f.spiffe_id.is_none() || f.parent_id.is_none() || f.selectors.is_empty() {
        bail!(
            "entry create needs --spiffe-id, --parent-id and at least one --selector (or --data FILE)"
        );
    }
    let mut spec = EntrySpec {
        id: args.entry_id,
        ..EntrySpec::default()
    };
    args.fields.apply(&mut spec);
    Ok(json!({ "entries": [spec] }))
}

async fn list(
    client: &super::client::AdminClient,
    output: Output,
    args: ListArgs,
) -> anyhow::Result<()> {
    let one_page = args.page_size.is_some() || args.page_token.is_some();
    let mut query = vec![format!(
        "page_size={}",
        args.page_size
            .unwrap_or(crate::service::entries::MAX_PAGE_SIZE)
    )];
    for (k, v) in [
        ("spiffe_id", &args.spiffe_id),
        ("parent_id", &args.parent_id),
        ("selector", &args.selector),
    ] {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(v)));
        }
    }
    let mut entries = Vec::new();
    let mut token = args.page_token.clone();
    let next = loop {
        let mut q = query.clone();
        if let Some(t) = &token {
            q.push(format!("page_token={}", encode(t)));
        }
        let page = client.get(&format!("/v1/entries?{}", q.join("&"))).await?;
        entries.extend(page["entries"].as_array().cloned().unwrap_or_default());
        let next = page["next_page_token"].as_str().map(str::to_owned);
        match next {
            Some(t) if !one_page => token = Some(t),
            other => break other,
        }
    };
    match output {
        Output::Json => print_json(&json!({ "entries": entries, "next_page_token": next })),
        Output::Text => {
            let mut t = Table::new(&["ID", "SPIFFE ID", "PARENT ID", "SELECTORS"]);
            for e in &entries {
                t.row(vec![
                    cell(&e["id"]),
                    cell(&e["spiffe_id"]),
                    cell(&e["parent_id"]),
                    cell(&e["selectors"]),
                ]);
            }
            let mut text = t.render();
            text.push_str(&format!(
                "{} {}\n",
                entries.len(),
                if entries.len() == 1 {
                    "entry"
                } else {
                    "entries"
                }
            ));
            if let Some(n) = &next {
                text.push_str(&format!("More entries follow: --page-token {n}\n"));
            }
            print(&text)
        }
    }
}

/// Prints one entry.
fn show(output: Output, e: &Value) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(e);
    }
    let lines = |v: &Value| {
        v.as_array().filter(|a| !a.is_empty()).map_or_else(
            || "-".to_owned(),
            |a| a.iter().map(cell).collect::<Vec<_>>().join("\n"),
        )
    };
    let or_default = |v: &Value| {
        if v.is_null() {
            "server default".to_owned()
        } else {
            cell(v)
        }
    };
    let mut pairs = vec![
        ("Entry ID", cell(&e["id"])),
        ("SPIFFE ID", cell(&e["spiffe_id"])),
        ("Parent ID", cell(&e["parent_id"])),
        ("Revision", cell(&e["revision"])),
        ("Selectors", lines(&e["selectors"])),
        ("X509-SVID TTL", or_default(&e["x509_svid_ttl"])),
        ("JWT-SVID TTL", or_default(&e["jwt_svid_ttl"])),
        ("Scope", cell(&e["scope"])),
    ];
    for (label, key) in [
        ("DNS names", "dns_names"),
        ("Federates with", "federates_with"),
    ] {
        if e[key].as_array().is_some_and(|a| !a.is_empty()) {
            pairs.push((label, lines(&e[key])));
        }
    }
    for (label, key) in [
        ("Min assurance", "min_assurance"),
        ("Max attestation age", "max_attestation_age"),
        ("Hint", "hint"),
        ("Expires at", "expires_at"),
    ] {
        if !e[key].is_null() {
            pairs.push((label, cell(&e[key])));
        }
    }
    if e["admin"] == true {
        pairs.push(("Admin", "true".to_owned()));
    }
    if e["downstream"] == true {
        pairs.push(("Downstream", "true".to_owned()));
    }
    print(&fields(&pairs))
}
