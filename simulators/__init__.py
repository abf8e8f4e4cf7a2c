"""Simulators of what surrounds the agent: the line PLCs, the MES and an embedded MQTT broker."""
