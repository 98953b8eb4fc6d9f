"""gateway/api: errors, the schema (fuzzed), hostile clients, the OpenAI client, operator routes."""
