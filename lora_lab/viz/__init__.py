"""Figure builders: records in, plotly ``go.Figure`` out."""
