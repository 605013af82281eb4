"""What every Nudge service needs and nothing more: settings, the event schemas, the Kafka
producer factory and consumer runner, database sessions and migrations, metrics, logging."""
