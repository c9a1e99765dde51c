//! The real `mayfly-server` binary: `policy validate` and `policy schema`,
//! offline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mayfly-server");

#[test]
fn policy_validate_accepts_a_good_file_and_names_errors_in_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.cedar");
    std::fs::write(
        &good,
        "@id(\"business-hours\")\nforbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)\nwhen { context.hour < 9 };\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["policy", "validate"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "valid: 6 policies");

    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit (principal, action, resource);\npermit (principal, action, resource)\nwhen { principal.colour == \"red\" };\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["policy", "validate"])
        .arg(&good)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:3:8: ", bad.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");

    let out = Command::new(BIN)
        .args(["policy", "validate", "--output", "json"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["line"], 3);
}

#[test]
fn policy_schema_prints_the_schema() {
    let out = Command::new(BIN)
        .args(["policy", "schema"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("namespace Mayfly") && text.contains("action issue_x509"),
        "{text}"
    );
}
