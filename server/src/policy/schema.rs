//! The policy schema (namespace `Mayfly`), embedded in the binary.
//!
//! The text lives in `mayfly.cedarschema`; `mayfly-server policy schema`
//! prints it. Every policy is validated against it at load time.

use std::sync::LazyLock;

use cedar_policy::Schema;

/// The schema as written (Cedar schema syntax).
pub const TEXT: &str = include_str!("mayfly.cedarschema");

/// The namespace of every Mayfly entity type and action.
pub const NAMESPACE: &str = "Mayfly";

static SCHEMA: LazyLock<Result<Schema, String>> = LazyLock::new(|| {
    Schema::from_cedarschema_str(TEXT)
        .map(|(schema, _warnings)| schema)
        .map_err(|e| format!("the built-in policy schema is invalid: {e}"))
});

/// The parsed schema. It is compiled into the binary and checked by a unit
/// test, so an error here is a build defect; it is reported, not panicked on.
pub fn schema() -> Result<&'static Schema, &'static str> {
    SCHEMA.as_ref().map_err(String::as_str)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_parses() {
        let schema = super::schema().unwrap();
        assert!(schema.actions().count() > 20);
    }
}
