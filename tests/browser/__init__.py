"""Real-browser (headless Chromium + Selenium) helpers for testing the MLflow UI."""
