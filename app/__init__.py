"""The capi_lab Gradio app (``python app/main.py``) and its browser driver; importable from the repository root."""
