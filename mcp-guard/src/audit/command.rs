//! `mcp-guard audit verify|trace`.
//!
//! Exit status: 0 on success; 1 when the chain breaks (`verify`), when no record matches
//! (`trace`, like grep), or when a file cannot be read. Failures are one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::{AuditCommand, AuditTraceArgs, AuditVerifyArgs};

use super::{TraceQuery, VerifyOptions, chain_order, trace, verify};

pub fn run(command: AuditCommand) -> ExitCode {
    match command {
        AuditCommand::Verify(args) => run_verify(args),
        AuditCommand::Trace(args) => run_trace(args),
    }
}

fn files(arguments: &[PathBuf]) -> Result<Vec<PathBuf>, ExitCode> {
    chain_order(arguments).map_err(|error| {
        eprintln!("mcp-guard: {error}");
        ExitCode::FAILURE
    })
}

fn run_verify(args: AuditVerifyArgs) -> ExitCode {
    let files = match files(&args.files) {
        Ok(files) => files,
        Err(code) => return code,
    };
    let options = VerifyOptions {
        partial: args.partial,
        head: args.head,
    };
    match verify(&files, &options) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(chain_break) => {
            eprintln!("{chain_break}");
            ExitCode::FAILURE
        }
    }
}

fn run_trace(args: AuditTraceArgs) -> ExitCode {
    let files = match files(&args.files) {
        Ok(files) => files,
        Err(code) => return code,
    };
    let query = match (args.of.instruction, args.of.session, args.of.trace) {
        (Some(id), _, _) => TraceQuery::Instruction(id),
        (_, Some(id), _) => TraceQuery::Session(id),
        (_, _, Some(id)) => TraceQuery::Trace(id),
        // clap requires exactly one of them.
        (None, None, None) => unreachable!("clap requires --instruction, --session or --trace"),
    };
    let report = match trace(&files, &query) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("mcp-guard: {error}");
            return ExitCode::FAILURE;
        }
    };
    for line in &report.unreadable {
        eprintln!("mcp-guard: warning: {line}");
    }
    if report.records == 0 {
        eprintln!(
            "mcp-guard: no audit record has {} \"{}\"",
            query.field(),
            query.id()
        );
        return ExitCode::FAILURE;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
    } else {
        print!("{}", report.to_text());
    }
    ExitCode::SUCCESS
}
