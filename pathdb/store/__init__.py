"""DuckDB store: schema, migrations on open, bulk Arrow writer, readers."""
