"""The Temporal worker: builds every client once and registers the workflow and activities."""
