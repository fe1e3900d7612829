//! The admin subcommands: a client of the daemon's control socket. Tables for people, `--json`
//! for scripts; every failure to reach the daemon says why and what to do.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result, bail};
use lockhub::control::protocol::{Answer, Request};
use serde_json::Value;

/// Sends `request` and returns the final answer's value, showing progress on stderr.
pub fn call(socket: &Path, request: &Request) -> Result<Value> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        let path = socket.display();
        match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("no control socket at {path}: is the daemon running? (systemctl status lockhub)")
            }
            std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                "permission denied on {path}: the control socket is for root and the lockhub-admin group; \
                 use sudo, or join the group (sudo usermod -aG lockhub-admin $USER, then log in again)"
            ),
            std::io::ErrorKind::ConnectionRefused => {
                anyhow::anyhow!("nothing listens on {path}: the daemon is not running (systemctl start lockhub)")
            }
            _ => anyhow::anyhow!("{path}: {e}"),
        }
    })?;
    let mut line = serde_json::to_vec(request).expect("requests serialise");
    line.push(b'\n');
    // A refused peer is answered (and the connection closed) before its request is read: a
    // failed write still leaves that answer to read.
    let sent = stream.write_all(&line);
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the answer")?;
        match serde_json::from_str::<Answer>(&line).with_context(|| format!("unreadable answer: {line}"))? {
            Answer::Progress(text) => lockhub::errln!("{text}…"),
            Answer::Ok(value) => return Ok(value),
            Answer::Error { code, message } => bail!("{message} ({code})"),
        }
    }
    sent.context("sending the request")?;
    bail!("the daemon closed the connection without an answer")
}

/// Asks "question [y/N]" on the terminal; refuses without one (scripts pass --yes).
pub fn confirm(question: &str) -> Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("{question}: not confirmed (no terminal); pass --yes to confirm from a script");
    }
    lockhub::standard_streams::ask(format_args!("{question} [y/N] "));
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not confirmed: nothing done");
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Writes rows as an aligned table.
fn table(out: &mut impl Write, headers: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut print = |cells: Vec<String>| {
        let line: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(out, "{}", line.join("  ").trim_end())
    };
    print(headers.iter().map(|h| h.to_string()).collect())?;
    if rows.is_empty() {
        print(vec!["(none)".into()])?;
    }
    for row in rows {
        print(row)?;
    }
    Ok(())
}

fn time(unix: &Value) -> String {
    unix.as_i64()
        .and_then(|t| jiff::Timestamp::from_second(t).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

/// Writes an answer for people (or as JSON).
pub fn show(request: &Request, value: &Value, json: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{}", serde_json::to_string_pretty(value).expect("values serialise"));
    }
    match request {
        Request::Status => {
            let cloud = if value["cloud"]["connected"] == true {
                format!("connected (broker {})", value["cloud"]["broker"])
            } else if value["cloud"]["configured"] == false {
                "not configured: local only".into()
            } else {
                "unreachable: working offline".into()
            };
            writeln!(out, "gateway:         {}", text(&value["gateway"]))?;
            writeln!(out, "version:         {}", text(&value["version"]))?;
            writeln!(out, "cloud:           {cloud}")?;
            writeln!(out, "locks:           {}", value["locks"])?;
            for adapter in value["adapters"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "adapter:         {}: home to {} lock(s), {} of {} links up",
                    text(&adapter["name"]),
                    adapter["locks"],
                    adapter["links"],
                    adapter["max_links"]
                )?;
            }
            writeln!(out, "reports queued:  {}", value["reports_queued"])?;
            writeln!(
                out,
                "claimed:         {}",
                if value["claimed"] == true { "yes" } else { "no (lockhub claim-code)" }
            )?;
            writeln!(
                out,
                "clock:           {}",
                if value["clock_synchronised"] == true { "synchronised" } else { "NOT synchronised" }
            )?;
            if value["deleted_rows_in_log"] == true {
                writeln!(
                    out,
                    "deletions:       deleted rows still in the store's log: another connection to the database keeps it in use (emptied as soon as it lets go)"
                )?;
            } else if value["deleted_rows_in_log"] == false {
                writeln!(out, "deletions:       complete")?;
            }
            Ok(())
        }
        Request::Locks => table(
            out,
            &["LOCK", "NAME", "STATE", "BATTERY", "DOOR", "LINK", "ADAPTER", "PAIRED"],
            rows(value, |l| {
                vec![
                    text(&l["lock"]),
                    text(&l["name"]),
                    text(&l["status"]["state"]),
                    l["status"]["battery"].as_u64().map_or("-".into(), |b| format!("{b}%")),
                    text(&l["status"]["door"]),
                    if l["connected"] == true {
                        "up".into()
                    } else if l["reachable"] == false {
                        "unreachable".into()
                    } else {
                        "idle".into()
                    },
                    text(&l["adapter"]),
                    time(&l["paired_at"]),
                ]
            }),
        ),
        Request::Audit { .. } => table(
            out,
            &["SEQ", "TIME", "ACTION", "OUTCOME", "DETAIL"],
            rows(value, |r| {
                vec![text(&r["seq"]), time(&r["at"]), text(&r["action"]), text(&r["outcome"]), text(&r["detail"])]
            }),
        ),
        Request::AuditVerify => {
            if value["intact"] == true {
                writeln!(out, "audit chain intact: {} record(s) verified", value["records"])?;
            } else {
                writeln!(out, "audit chain BROKEN at record {}: {}", value["seq"], text(&value["reason"]))?;
            }
            Ok(())
        }
        Request::Users => table(
            out,
            &["KEY", "SINCE", "GRANTS"],
            rows(value, |u| vec![text(&u["key"]), time(&u["since"]), text(&u["grants"])]),
        ),
        Request::ForgetUser { key } => writeln!(out, "forgot user {key}: their key, grants and passcodes are deleted"),
        Request::Unbind { lock } => {
            writeln!(out, "unbound lock {lock}")?;
            if value["lock_told"] != true {
                writeln!(out, "the lock could not be reached and still holds its pairing: factory-reset it")?;
            }
            Ok(())
        }
        Request::Scan { .. } => table(
            out,
            &["TAG", "LOCK", "ADDRESS", "RSSI", "PAIRING MODE", "PAIRED HERE"],
            rows(value, |a| {
                vec![
                    text(&a["tag"]),
                    text(&a["lock"]),
                    text(&a["address"]),
                    format!("{} dBm", a["rssi"]),
                    if a["pairing_mode"] == true { "yes".into() } else { "no".into() },
                    if a["paired_here"] == true { "yes".into() } else { "no".into() },
                ]
            }),
        ),
        Request::Pair { lock, .. } => writeln!(out, "paired lock {lock}"),
        Request::Rekey => writeln!(out, "store re-sealed under a new master key ({} secret(s))", value["resealed"]),
    }
}

fn rows(value: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    value.as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default()
}
