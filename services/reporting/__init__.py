"""reporting service: see DESIGN.md and its issue; not built yet."""
