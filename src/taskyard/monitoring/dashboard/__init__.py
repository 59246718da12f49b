"""The dashboard: one module per page, chart maths, Jinja2 templates and static files."""
