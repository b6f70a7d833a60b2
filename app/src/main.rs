use clap::Parser;
use refusal_lens::cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    refusal_lens::pin_thread_count(cli.command.is_none());
    let result = cli.model_choice().and_then(|choice| match cli.command {
        Some(command) => refusal_lens::cli::run(command, choice),
        None => refusal_lens::gui::run(choice),
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes (a cause already quoted by its parent is
            // not repeated).
            let mut line = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !line.contains(&cause) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&cause);
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}
