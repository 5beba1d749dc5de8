"""Alert intake: Alertmanager webhooks and platform NATS events start (or attach to) remediations."""
