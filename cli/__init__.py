"""The `hlwq` command line: parse arguments, then call flows, store/ and runtime/.
The only layer that imports deployments/."""
