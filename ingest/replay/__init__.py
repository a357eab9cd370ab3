"""Replays (the runbook's Replay Operations): plans in `plans`, running them in `runner`,
the operator's commands in `ingest.cli.replayctl`. See docs/replay.md."""
