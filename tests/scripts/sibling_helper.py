HELPER_VALUE = "sibling"
