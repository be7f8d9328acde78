"""cul8er's lifecycle task modules and the workflows they make up."""
