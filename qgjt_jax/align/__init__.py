"""From raw photos to aligned face crops: five points, then a similarity warp.

five_points      the 112 x 112 five-point template and the warp onto it
landmarks_file   five points per photo from a CSV written by any detector
detector         a built-in detector (the `.[align]` extra: dlib)
faces            which faces of which photos to crop, and the crops
"""
