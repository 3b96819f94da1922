//! What a command prints: with `--json`, one JSON document on stdout; otherwise lines for a person (the
//! result on stdout, notes on stderr).

use deckhand_tools::ToolError;

/// Prints `report` as JSON when `json`, else as `human` writes it.
pub fn emit<T: serde::Serialize>(
    json: bool,
    report: &T,
    human: impl FnOnce(&T),
) -> Result<(), ToolError> {
    if json {
        let text = serde_json::to_string_pretty(report).map_err(ToolError::Report)?;
        println!("{text}");
    } else {
        human(report);
    }
    Ok(())
}
