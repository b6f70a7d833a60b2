use clap::Parser;
use refusal_lens::cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // candle asks for its thread count on every matmul, and without RAYON_NUM_THREADS that
    // means parsing /proc/cpuinfo each time (measured: 9 of 32 s when collecting 480
    // prompts). Pin it once, before any thread starts. The GUI leaves one core to the UI
    // thread: with every core busy-waiting in rayon, a 2-core machine rendering in software
    // generated 4 tok/s instead of 82.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = candle_core::utils::get_num_threads();
        let n = if cli.command.is_none() {
            cores.saturating_sub(1).max(1)
        } else {
            cores
        };
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let result = match cli.command {
        Some(command) => refusal_lens::cli::run(
            command,
            refusal_lens::cli::ModelChoice {
                model: cli.model,
                adapter: cli.adapter,
                base: cli.base,
            },
        ),
        None => refusal_lens::gui::run(refusal_lens::cli::ModelChoice {
            model: cli.model,
            adapter: cli.adapter,
            base: cli.base,
        }),
    };
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
