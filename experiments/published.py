"""The published table of Singh et al. (2020), Figure 4: accuracy in percent."""

# (dataset, split) -> {cell: accuracy %}; cells are 'original', 'ldp_b1', ..., 'dpsgd_b4'.
PUBLISHED_ACCURACY = {
    ('pneumonia', 'train'): {'original': 99.76, 'ldp_b1': 89.24, 'ldp_b2': 83.66, 'ldp_b4': 78.60,
                             'dpsgd_b1': 85.87, 'dpsgd_b2': 83.55, 'dpsgd_b4': 82.53},
    ('pneumonia', 'test'): {'original': 90.22, 'ldp_b1': 91.03, 'ldp_b2': 89.58, 'ldp_b4': 91.67,
                            'dpsgd_b1': 79.81, 'dpsgd_b2': 77.72, 'dpsgd_b4': 79.65},
    ('aptos', 'train'): {'original': 98.39, 'ldp_b1': 77.19, 'ldp_b2': 65.52, 'ldp_b4': 58.55,
                         'dpsgd_b1': 43.77, 'dpsgd_b2': 29.39, 'dpsgd_b4': 17.82},
    ('aptos', 'test'): {'original': 80.21, 'ldp_b1': 76.26, 'ldp_b2': 73.26, 'ldp_b4': 72.17,
                        'dpsgd_b1': 50.89, 'dpsgd_b2': 49.25, 'dpsgd_b4': 43.38},
}
